// Package plot draws the benchmarks' charts as hand-written SVG: grouped
// bar charts and line charts, each with a title, axis labels and a footer
// naming the machine, date and command.
package plot

import (
	"fmt"
	"html"
	"math"
	"strings"
)

var palette = []string{"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"}

// Series is one named set of values (one per category or x point).
type Series struct {
	Name   string
	X      []float64 // line charts only
	Values []float64
}

// Chart holds what both chart kinds share.
type Chart struct {
	Title, YLabel, XLabel, Footer string
	LogY, LogX                    bool
}

const (
	svgW, svgH             = 960.0, 540.0
	padL, padR, padT, padB = 80.0, 230.0, 50.0, 120.0
	plotW, plotH           = svgW - padL - padR, svgH - padT - padB
	fontAttr               = `font-family="sans-serif"`
)

func esc(s string) string { return html.EscapeString(s) }

func (c Chart) header(b *strings.Builder) {
	fmt.Fprintf(b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f">`+"\n", svgW, svgH, svgW, svgH)
	fmt.Fprintf(b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(b, `<text x="%.0f" y="28" font-size="17" font-weight="bold" %s>%s</text>`+"\n", padL, fontAttr, esc(c.Title))
	lines := strings.Split(c.Footer, "\n")
	for i, l := range lines {
		fmt.Fprintf(b, `<text x="10" y="%.0f" font-size="10" fill="#555" %s>%s</text>`+"\n", svgH-8-float64(len(lines)-1-i)*13, fontAttr, esc(l))
	}
	fmt.Fprintf(b, `<text transform="translate(18,%.0f) rotate(-90)" text-anchor="middle" font-size="12" %s>%s</text>`+"\n", padT+plotH/2, fontAttr, esc(c.YLabel))
	if c.XLabel != "" {
		fmt.Fprintf(b, `<text x="%.0f" y="%.0f" text-anchor="middle" font-size="12" %s>%s</text>`+"\n", padL+plotW/2, padT+plotH+40, fontAttr, esc(c.XLabel))
	}
}

// scale maps values to [0,1] linearly or logarithmically and returns the
// tick values.
type scale struct {
	lo, hi float64
	log    bool
}

func newScale(vals []float64, log bool) scale {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range vals {
		if v <= 0 && log || math.IsNaN(v) {
			continue
		}
		lo, hi = math.Min(lo, v), math.Max(hi, v)
	}
	if math.IsInf(lo, 0) {
		lo, hi = 0, 1
	}
	if log {
		lo = math.Pow(10, math.Floor(math.Log10(lo)))
		hi = math.Pow(10, math.Ceil(math.Log10(hi)))
		if hi <= lo {
			hi = lo * 10
		}
		return scale{lo, hi, true}
	}
	lo = 0
	if hi <= 0 {
		hi = 1
	}
	step := niceStep(hi / 5)
	hi = math.Ceil(hi/step) * step
	return scale{lo, hi, false}
}

func niceStep(x float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

func (s scale) pos(v float64) float64 {
	if s.log {
		if v <= 0 {
			return 0
		}
		return (math.Log10(v) - math.Log10(s.lo)) / (math.Log10(s.hi) - math.Log10(s.lo))
	}
	return (v - s.lo) / (s.hi - s.lo)
}

func (s scale) ticks() []float64 {
	var t []float64
	if s.log {
		for v := s.lo; v <= s.hi*1.0001; v *= 10 {
			t = append(t, v)
		}
		return t
	}
	step := niceStep((s.hi - s.lo) / 5)
	for v := s.lo; v <= s.hi+step/1000; v += step {
		t = append(t, v)
	}
	return t
}

func fmtTick(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 1e4 || math.Abs(v) < 0.01:
		return fmt.Sprintf("%.0e", v)
	case v == math.Trunc(v):
		return fmt.Sprintf("%.0f", v)
	default:
		return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".")
	}
}

func (c Chart) yAxis(b *strings.Builder, s scale) {
	for _, t := range s.ticks() {
		y := padT + plotH - s.pos(t)*plotH
		fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", padL, padL+plotW, y, y)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="end" font-size="11" %s>%s</text>`+"\n", padL-6, y+4, fontAttr, fmtTick(t))
	}
	fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#333"/>`+"\n", padL, padL, padT, padT+plotH)
	fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#333"/>`+"\n", padL, padL+plotW, padT+plotH, padT+plotH)
}

func legend(b *strings.Builder, names []string, line bool) {
	for i, n := range names {
		y := padT + 10 + float64(i)*18
		col := palette[i%len(palette)]
		if line {
			fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="%s" stroke-width="2"/>`+"\n", padL+plotW+15, padL+plotW+31, y-4, y-4, col)
		} else {
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="14" height="10" fill="%s"/>`+"\n", padL+plotW+15, y-9, col)
		}
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="11" %s>%s</text>`+"\n", padL+plotW+36, y, fontAttr, esc(n))
	}
}

// BarChart draws one group of bars per category, one bar per series.
func BarChart(c Chart, categories []string, series []Series) string {
	var b strings.Builder
	c.header(&b)
	var all []float64
	for _, s := range series {
		all = append(all, s.Values...)
	}
	sc := newScale(all, c.LogY)
	c.yAxis(&b, sc)
	gw := plotW / float64(max(1, len(categories)))
	bw := gw * 0.8 / float64(max(1, len(series)))
	for i, cat := range categories {
		x0 := padL + float64(i)*gw + gw*0.1
		for j, s := range series {
			if i >= len(s.Values) || s.Values[i] <= 0 || math.IsNaN(s.Values[i]) {
				continue
			}
			h := sc.pos(s.Values[i]) * plotH
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s / %s: %s</title></rect>`+"\n",
				x0+float64(j)*bw, padT+plotH-h, math.Max(bw-1, 1), h, palette[j%len(palette)], esc(cat), esc(s.Name), fmtTick(s.Values[i]))
		}
		fmt.Fprintf(&b, `<text transform="translate(%.1f,%.1f) rotate(30)" font-size="11" %s>%s</text>`+"\n", x0+gw*0.3, padT+plotH+14, fontAttr, esc(cat))
	}
	names := make([]string, len(series))
	for i, s := range series {
		names[i] = s.Name
	}
	if len(series) > 1 || series[0].Name != "" {
		legend(&b, names, false)
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// LineChart draws each series as a polyline with point markers.
func LineChart(c Chart, series []Series) string {
	var b strings.Builder
	c.header(&b)
	var xs, ys []float64
	for _, s := range series {
		xs = append(xs, s.X...)
		ys = append(ys, s.Values...)
	}
	sy := newScale(ys, c.LogY)
	sx := newScale(xs, c.LogX)
	if !c.LogX {
		lo := math.Inf(1)
		for _, x := range xs {
			lo = math.Min(lo, x)
		}
		if lo > 0 && !math.IsInf(lo, 0) {
			sx.lo = 0
		}
	}
	c.yAxis(&b, sy)
	for _, t := range sx.ticks() {
		x := padL + sx.pos(t)*plotW
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="11" %s>%s</text>`+"\n", x, padT+plotH+16, fontAttr, fmtTick(t))
	}
	names := make([]string, len(series))
	for i, s := range series {
		names[i] = s.Name
		col := palette[i%len(palette)]
		var pts []string
		for k := range s.X {
			if k >= len(s.Values) || (c.LogY && s.Values[k] <= 0) || (c.LogX && s.X[k] <= 0) {
				continue
			}
			x := padL + sx.pos(s.X[k])*plotW
			y := padT + plotH - sy.pos(s.Values[k])*plotH
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
			if len(s.X) <= 30 {
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title>%s: %s, %s</title></circle>`+"\n", x, y, col, esc(s.Name), fmtTick(s.X[k]), fmtTick(s.Values[k]))
			}
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", col, strings.Join(pts, " "))
	}
	legend(&b, names, true)
	b.WriteString("</svg>\n")
	return b.String()
}
