package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func writeBlob(t *testing.T, layout string, b []byte) string {
	t.Helper()
	sum := sha256.Sum256(b)
	h := hex.EncodeToString(sum[:])
	dir := filepath.Join(layout, "blobs", "sha256")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, h), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return "sha256:" + h
}

type entry struct {
	name, body, link string
	dir              bool
}

func layer(t *testing.T, es []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.body)), Typeflag: tar.TypeReg}
		if e.dir {
			h.Typeflag, h.Mode, h.Size = tar.TypeDir, 0o755, 0
		}
		if e.link != "" {
			h.Typeflag, h.Linkname, h.Size = tar.TypeSymlink, e.link, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	gz.Close()
	return buf.Bytes()
}

// TestUnpackOCI: layers apply in order, whiteouts delete, paths cannot
// escape the destination.
func TestUnpackOCI(t *testing.T) {
	layout := t.TempDir()
	l1 := writeBlob(t, layout, layer(t, []entry{
		{name: "app/", dir: true}, {name: "app/fn.py", body: "v1"}, {name: "app/old", body: "x"},
		{name: "etc/conf/a", body: "a"}, {name: "bin", link: "usr/bin"}, {name: "../../escape", body: "no"},
	}))
	l2 := writeBlob(t, layout, layer(t, []entry{
		{name: "app/fn.py", body: "v2"}, {name: "app/.wh.old"}, {name: "etc/conf/.wh..wh..opq"}, {name: "etc/conf/b", body: "b"},
	}))
	man, _ := json.Marshal(map[string]any{"schemaVersion": 2, "layers": []map[string]string{
		{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1},
		{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l2}}})
	md := writeBlob(t, layout, man)
	idx, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []map[string]any{
		{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "annotations": map[string]string{refAnnotation: "fn:1"}}}})
	if err := os.WriteFile(filepath.Join(layout, "index.json"), idx, 0o644); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(t.TempDir(), "root")
	if err := UnpackOCI(layout, "nope", dest); err == nil {
		t.Fatal("unknown ref accepted")
	}
	if err := UnpackOCI(layout, "fn:1", dest); err != nil {
		t.Fatal(err)
	}
	read := func(p string) string { b, _ := os.ReadFile(filepath.Join(dest, p)); return string(b) }
	if read("app/fn.py") != "v2" || read("etc/conf/b") != "b" {
		t.Errorf("contents: fn.py %q conf/b %q", read("app/fn.py"), read("etc/conf/b"))
	}
	for _, gone := range []string{"app/old", "etc/conf/a"} {
		if _, err := os.Lstat(filepath.Join(dest, gone)); err == nil {
			t.Errorf("%s survived its whiteout", gone)
		}
	}
	if l, _ := os.Readlink(filepath.Join(dest, "bin")); l != "usr/bin" {
		t.Errorf("symlink bin -> %q", l)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dest), "escape")); err == nil {
		t.Error("a ../ entry escaped the destination")
	}
	if read("escape") != "no" {
		t.Error("the ../ entry was not confined to the destination")
	}
	if err := UnpackOCI(layout, "fn:1", dest); err == nil {
		t.Error("unpacking over an existing directory accepted")
	}
	// A layer writing through a symlink it planted is refused.
	outside := t.TempDir()
	evil := writeBlob(t, layout, layer(t, []entry{{name: "x", link: outside}, {name: "x/pwned", body: "!"}}))
	man2, _ := json.Marshal(map[string]any{"layers": []map[string]string{{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": evil}}})
	md2 := writeBlob(t, layout, man2)
	idx2, _ := json.Marshal(map[string]any{"manifests": []map[string]any{{"digest": md2}}})
	os.WriteFile(filepath.Join(layout, "index.json"), idx2, 0o644)
	if err := UnpackOCI(layout, "", filepath.Join(t.TempDir(), "r")); err == nil {
		t.Error("write through a planted symlink accepted")
	}
	if _, err := os.Stat(filepath.Join(outside, "pwned")); err == nil {
		t.Error("a layer wrote outside the image through a symlink")
	}
}
