package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
	"time"
)

// seedFrames are valid frames of every type, for tests and fuzz seeds.
func seedFrames() map[string][]byte {
	ch := Challenge{Version: ProtocolVersion}
	ch.Nonce[3] = 9
	h := Hello{Version: ProtocolVersion, Name: "node-a"}
	h.MAC[0], h.Nonce[31] = 1, 2
	a := Auth{Name: "node-b"}
	a.MAC[5] = 7
	desc := DescResponse{Desc: []byte("descriptor"), WorkingSet: []Range{{0x1000, 0x2000}, {0x10000, 0x1000}}}
	pr := PagesRequest{Seed: "a/s1", Ranges: []Range{{0x1000, 0x1000}, {0x8000, 0x4000}}}
	fr := ForkRequest{Seed: "a/s1", Count: 3, Eager: true, Payload: []byte(`{"x":1}`)}
	lr := LeaseRequest{Seed: "a/s1", Delta: -1}
	em := ErrorMsg{Code: CodeUnknownSeed, Msg: "unknown seed a/s9"}
	ir := InvokeRequest{Function: "fn", Seed: "a/s1", Timeout: 1500 * time.Millisecond, Meta: []byte(`{"method":"POST"}`), Body: []byte("hello")}
	iresp := InvokeResponse{Status: 200, Kind: KindFork, Start: 1200 * time.Microsecond, Run: 3 * time.Millisecond, Child: "c-1", ContentType: "text/plain", Body: []byte("world")}
	sresp := iresp
	sresp.Seed = "a/s-12"
	return map[string][]byte{
		"invokereq":   AppendFrame(nil, TypeInvokeReq, 7, ir.Encode()),
		"invokestage": AppendFrame(nil, TypeInvokeResp, 7, sresp.Encode()),
		"invokeresp":  AppendFrame(nil, TypeInvokeResp, 7, iresp.Encode()),
		"callreq":     AppendFrame(nil, TypeCallReq, 8, EncodeCall("fn-deploy", []byte(`{"name":"fn"}`))),
		"callresp":    AppendFrame(nil, TypeCallResp, 8, []byte{2, 0, 0, 0, '{', '}'}),
		"challenge":   AppendFrame(nil, TypeChallenge, 0, ch.Encode()),
		"hello":       AppendFrame(nil, TypeHello, 0, h.Encode()),
		"auth":        AppendFrame(nil, TypeAuth, 0, a.Encode()),
		"descreq":     AppendFrame(nil, TypeDescReq, 1, EncodeSeed("a/s1")),
		"descresp":    AppendFrame(nil, TypeDescResp, 1, desc.Encode()),
		"pagesreq":    AppendFrame(nil, TypePagesReq, 2, pr.Encode()),
		"pagesresp":   AppendFrame(nil, TypePagesResp, 2, bytes.Repeat([]byte{0xab}, 3*PageSize)),
		"forkreq":     AppendFrame(nil, TypeForkReq, 3, fr.Encode()),
		"forkresp":    AppendFrame(nil, TypeForkResp, 3, (&ForkResponse{Children: []ForkedChild{{"c1", 10, 300}, {"c2", 11, 310}}}).Encode()),
		"leasereq":    AppendFrame(nil, TypeLeaseReq, 4, lr.Encode()),
		"leaseresp":   AppendFrame(nil, TypeLeaseResp, 4, nil),
		"ping":        AppendFrame(nil, TypePing, 5, nil),
		"pong":        AppendFrame(nil, TypePong, 5, nil),
		"error":       AppendFrame(nil, TypeError, 6, em.Encode()),
		"huge":        {0xff, 0xff, 0xff, 0xff, TypePagesResp, 1, 0, 0, 0, 0, 0, 0, 0},
		"short":       {9, 0, 0, 0, TypePing},
		"http":        []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
	}
}

func TestFrameRoundTrip(t *testing.T) {
	for name, b := range seedFrames() {
		f, err := ReadFrame(bytes.NewReader(b), 0)
		switch name {
		case "huge", "short", "http":
			if err == nil {
				t.Errorf("%s: decoded garbage: %+v", name, f)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := AppendFrame(nil, f.Type, f.ID, f.Payload); !bytes.Equal(got, b) {
			t.Errorf("%s: re-encoded differently", name)
		}
	}
}

func TestPayloadRoundTrip(t *testing.T) {
	pr := PagesRequest{Seed: "n/s", Ranges: []Range{{0, PageSize}, {1 << 40, 8 * PageSize}}}
	gotPR, err := DecodePagesRequest(pr.Encode())
	if err != nil || !reflect.DeepEqual(gotPR, pr) {
		t.Fatalf("pages request: %+v %v", gotPR, err)
	}
	fr := ForkRequest{Seed: "n/s", Count: 7, Payload: []byte("{}")}
	gotFR, err := DecodeForkRequest(fr.Encode())
	if err != nil || !reflect.DeepEqual(gotFR, fr) {
		t.Fatalf("fork request: %+v %v", gotFR, err)
	}
	cs := ForkResponse{Children: []ForkedChild{{"x", -1, 1 << 50}, {"", 0, 0}}, Code: CodeInternal, Msg: "out of memory"}
	gotCS, err := DecodeForkResponse(cs.Encode())
	if err != nil || !reflect.DeepEqual(gotCS, cs) {
		t.Fatalf("fork response: %+v %v", gotCS, err)
	}
	dr := DescResponse{Desc: []byte{1, 2, 3}, WorkingSet: []Range{{4096, 4096}}}
	gotDR, err := DecodeDescResponse(dr.Encode())
	if err != nil || !reflect.DeepEqual(gotDR, dr) {
		t.Fatalf("descriptor response: %+v %v", gotDR, err)
	}
	long := ErrorMsg{Code: 6, Msg: string(bytes.Repeat([]byte("é"), MaxMessage))}
	gotEM, err := DecodeError(long.Encode())
	if err != nil || len(gotEM.Msg) > MaxMessage || gotEM.Msg != long.Msg[:len(gotEM.Msg)] {
		t.Fatalf("long error message: %d bytes, %v", len(gotEM.Msg), err)
	}
}

func TestDecodeLimits(t *testing.T) {
	// Too many ranges, claimed without the bytes behind them.
	var e encoder
	e.str16("n/s")
	e.u32(1 << 31)
	if _, err := DecodePagesRequest(e.b); !errors.Is(err, ErrTooLarge) {
		t.Errorf("2^31 ranges: %v", err)
	}
	// 1025 real ranges.
	pr := PagesRequest{Seed: "n/s"}
	for i := 0; i <= MaxRanges; i++ {
		pr.Ranges = append(pr.Ranges, Range{uint64(i) * 2 * PageSize, PageSize})
	}
	if _, err := DecodePagesRequest(pr.Encode()); !errors.Is(err, ErrTooLarge) {
		t.Errorf("1025 ranges: %v", err)
	}
	// More than 4 MiB.
	pr.Ranges = []Range{{0, MaxPagesBytes}, {MaxPagesBytes, PageSize}}
	if _, err := DecodePagesRequest(pr.Encode()); !errors.Is(err, ErrTooLarge) {
		t.Errorf("4 MiB + 4 KiB: %v", err)
	}
	// Misaligned, empty, wrapping.
	for _, g := range []Range{{1, PageSize}, {0, 100}, {0, 0}, {^uint64(0) &^ (PageSize - 1), 2 * PageSize}} {
		pr.Ranges = []Range{g}
		if _, err := DecodePagesRequest(pr.Encode()); !errors.Is(err, ErrBadRange) {
			t.Errorf("range %+v: %v", g, err)
		}
	}
	// A count within the cap but beyond the remaining bytes.
	e = encoder{}
	e.str16("n/s")
	e.u32(MaxRanges)
	if _, err := DecodePagesRequest(e.b); !errors.Is(err, ErrMalformed) {
		t.Errorf("1024 claimed ranges, none present: %v", err)
	}
	// Long seed id, long node name, huge descriptor / payload / children.
	if _, err := DecodeSeed(EncodeSeed(string(make([]byte, MaxSeedID+1)))); !errors.Is(err, ErrTooLarge) {
		t.Errorf("long seed: %v", err)
	}
	h := Hello{Name: string(make([]byte, MaxNodeName+1))}
	if _, err := DecodeHello(h.Encode()); !errors.Is(err, ErrTooLarge) {
		t.Errorf("long name: %v", err)
	}
	e = encoder{}
	e.u32(MaxDescriptor + 1)
	if _, err := DecodeDescResponse(e.b); !errors.Is(err, ErrTooLarge) {
		t.Errorf("huge descriptor: %v", err)
	}
	e = encoder{}
	e.u32(0)
	e.u32(0xffffffff)
	if _, err := DecodeDescResponse(e.b); !errors.Is(err, ErrTooLarge) {
		t.Errorf("huge working set: %v", err)
	}
	e = encoder{}
	e.str16("n/s")
	e.u32(1)
	e.u8(0)
	e.u32(0xffffffff)
	if _, err := DecodeForkRequest(e.b); !errors.Is(err, ErrTooLarge) {
		t.Errorf("huge fork payload: %v", err)
	}
	e = encoder{}
	e.u32(0xffffffff)
	if _, err := DecodeForkResponse(e.b); !errors.Is(err, ErrTooLarge) {
		t.Errorf("huge child count: %v", err)
	}
	// Trailing bytes.
	if _, err := DecodeSeed(append(EncodeSeed("n/s"), 0)); !errors.Is(err, ErrMalformed) {
		t.Errorf("trailing byte: %v", err)
	}
	// Frame headers.
	for _, tc := range []struct {
		h    []byte
		want error
	}{
		{[]byte{8, 0, 0, 0, TypePing, 0, 0, 0, 0, 0, 0, 0, 0}, ErrMalformed},
		{[]byte{9, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0, 0}, ErrMalformed},
		{[]byte{0, 0, 0, 1, TypePing, 0, 0, 0, 0, 0, 0, 0, 0}, ErrTooLarge},
		{[]byte{0xff, 0xff, 0xff, 0xff, TypeDescResp, 0, 0, 0, 0, 0, 0, 0, 0}, ErrTooLarge},
	} {
		if _, err := ReadFrame(bytes.NewReader(tc.h), 0); !errors.Is(err, tc.want) {
			t.Errorf("header %x: %v, want %v", tc.h, err, tc.want)
		}
	}
}

// allocated returns the bytes f allocates (roughly; other goroutines count
// too).
func allocated(f func()) uint64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	f()
	runtime.ReadMemStats(&b)
	return b.TotalAlloc - a.TotalAlloc
}

func TestHugeClaimsDoNotAllocate(t *testing.T) {
	// A descriptor response claiming the maximum length, with 1 KiB of
	// data behind it: allocation must follow the data, not the claim.
	var h [HeaderSize]byte
	putHeader(h[:], TypeDescResp, 1, int(maxFrameLength(TypeDescResp)-minFrameLength))
	in := append(h[:], make([]byte, 1024)...)
	n := allocated(func() {
		if _, err := ReadFrame(bytes.NewReader(in), 0); err == nil {
			t.Error("truncated frame decoded")
		}
	})
	if n > 2<<20 {
		t.Errorf("truncated 20 MiB claim allocated %d bytes", n)
	}
	var e encoder
	e.str16("n/s")
	e.u32(1 << 31)
	n = allocated(func() {
		for i := 0; i < 100; i++ {
			_, _ = DecodePagesRequest(e.b)
		}
	})
	if n > 1<<20 {
		t.Errorf("100 decodes of a 2^31-range claim allocated %d bytes", n)
	}
}

// fuzzTargets lists the payload decoders with a re-encoder for the
// round-trip check.
var fuzzPayload = map[uint8]func([]byte) ([]byte, error){
	TypeChallenge: func(p []byte) ([]byte, error) {
		v, err := DecodeChallenge(p)
		return v.Encode(), err
	},
	TypeHello: func(p []byte) ([]byte, error) {
		v, err := DecodeHello(p)
		return v.Encode(), err
	},
	TypeAuth: func(p []byte) ([]byte, error) {
		v, err := DecodeAuth(p)
		return v.Encode(), err
	},
	TypeDescReq: func(p []byte) ([]byte, error) {
		v, err := DecodeSeed(p)
		return EncodeSeed(v), err
	},
	TypeDescResp: func(p []byte) ([]byte, error) {
		v, err := DecodeDescResponse(p)
		return v.Encode(), err
	},
	TypePagesReq: func(p []byte) ([]byte, error) {
		v, err := DecodePagesRequest(p)
		return v.Encode(), err
	},
	TypeForkReq: func(p []byte) ([]byte, error) {
		v, err := DecodeForkRequest(p)
		return v.Encode(), err
	},
	TypeForkResp: func(p []byte) ([]byte, error) {
		v, err := DecodeForkResponse(p)
		return v.Encode(), err
	},
	TypeLeaseReq: func(p []byte) ([]byte, error) {
		v, err := DecodeLeaseRequest(p)
		return v.Encode(), err
	},
	TypeError: func(p []byte) ([]byte, error) {
		v, err := DecodeError(p)
		return v.Encode(), err
	},
	TypeInvokeReq: func(p []byte) ([]byte, error) {
		v, err := DecodeInvokeRequest(p)
		return v.Encode(), err
	},
	TypeInvokeResp: func(p []byte) ([]byte, error) {
		v, err := DecodeInvokeResponse(p)
		return v.Encode(), err
	},
	TypeCallReq: func(p []byte) ([]byte, error) {
		op, body, err := DecodeCall(p)
		return EncodeCall(op, body), err
	},
}

// checkPayload decodes p as a payload of typ; a successful decode must
// re-encode to the same bytes.
func checkPayload(t *testing.T, typ uint8, p []byte) {
	dec := fuzzPayload[typ]
	if dec == nil {
		return
	}
	out, err := dec(p)
	if err != nil {
		return
	}
	if !bytes.Equal(out, p) {
		t.Fatalf("type %d: %x re-encoded as %x", typ, p, out)
	}
}

func FuzzDecodeFrame(f *testing.F) {
	for _, b := range seedFrames() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		for {
			fr, err := ReadFrame(r, 0)
			if err != nil {
				return
			}
			if uint64(len(fr.Payload)) > uint64(maxFrameLength(fr.Type)) {
				t.Fatalf("payload of %d bytes over the type limit", len(fr.Payload))
			}
			checkPayload(t, fr.Type, fr.Payload)
		}
	})
}

// payloadOf returns the payload of a seed frame.
func payloadOf(b []byte) []byte { return b[HeaderSize:] }

func FuzzDecodePagesRequest(f *testing.F) {
	fs := seedFrames()
	f.Add(payloadOf(fs["pagesreq"]))
	f.Add([]byte{3, 0, 'n', '/', 's', 0, 0, 0, 0x80})
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := DecodePagesRequest(p)
		if err != nil {
			return
		}
		if len(r.Ranges) > MaxRanges || r.Total() > MaxPagesBytes {
			t.Fatalf("limits not enforced: %d ranges, %d bytes", len(r.Ranges), r.Total())
		}
		checkPayload(t, TypePagesReq, p)
	})
}

func FuzzDecodeDescResponse(f *testing.F) {
	f.Add(payloadOf(seedFrames()["descresp"]))
	f.Fuzz(func(t *testing.T, p []byte) { checkPayload(t, TypeDescResp, p) })
}

func FuzzDecodeForkRequest(f *testing.F) {
	f.Add(payloadOf(seedFrames()["forkreq"]))
	f.Fuzz(func(t *testing.T, p []byte) { checkPayload(t, TypeForkReq, p) })
}

func FuzzDecodeForkResponse(f *testing.F) {
	f.Add(payloadOf(seedFrames()["forkresp"]))
	f.Fuzz(func(t *testing.T, p []byte) { checkPayload(t, TypeForkResp, p) })
}

// FuzzDecodePayload covers the small payloads: the first byte picks the
// frame type.
func FuzzDecodePayload(f *testing.F) {
	for _, b := range seedFrames() {
		if len(b) >= HeaderSize {
			f.Add(append([]byte{b[4]}, payloadOf(b)...))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		checkPayload(t, data[0], data[1:])
	})
}

// TestWriteFuzzCorpus regenerates testdata/fuzz (run with
// MITOSIS_WRITE_CORPUS=1).
func TestWriteFuzzCorpus(t *testing.T) {
	if os.Getenv("MITOSIS_WRITE_CORPUS") == "" {
		t.Skip("set MITOSIS_WRITE_CORPUS=1 to regenerate testdata/fuzz")
	}
	write := func(target, name string, data []byte) {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	fs := seedFrames()
	all := make([]byte, 0)
	for name, b := range fs {
		write("FuzzDecodeFrame", name, b)
		if len(b) >= HeaderSize && maxFrameLength(b[4]) != 0 {
			write("FuzzDecodePayload", name, append([]byte{b[4]}, payloadOf(b)...))
			if name != "huge" && name != "short" && name != "http" {
				all = append(all, b...)
			}
		}
	}
	write("FuzzDecodeFrame", "stream", all)
	write("FuzzDecodePagesRequest", "valid", payloadOf(fs["pagesreq"]))
	var e encoder
	e.str16("n/s")
	e.u32(MaxRanges + 1)
	write("FuzzDecodePagesRequest", "toomany", e.b)
	big := PagesRequest{Seed: "n/s", Ranges: []Range{{0, MaxPagesBytes}, {MaxPagesBytes, PageSize}}}
	write("FuzzDecodePagesRequest", "toolarge", big.Encode())
	write("FuzzDecodeDescResponse", "valid", payloadOf(fs["descresp"]))
	e = encoder{}
	e.u32(0)
	e.u32(0xffffffff)
	write("FuzzDecodeDescResponse", "hugews", e.b)
	write("FuzzDecodeForkRequest", "valid", payloadOf(fs["forkreq"]))
	write("FuzzDecodeForkResponse", "valid", payloadOf(fs["forkresp"]))
	var c [4]byte
	binary.LittleEndian.PutUint32(c[:], 0xffffffff)
	write("FuzzDecodeForkResponse", "hugecount", c[:])
	write("FuzzDecodeInvokeRequest", "valid", payloadOf(fs["invokereq"]))
	write("FuzzDecodeInvokeResponse", "valid", payloadOf(fs["invokeresp"]))
	e = encoder{}
	e.str16("fn")
	e.str16("")
	e.u32(1)
	e.u32(0)
	e.u32(MaxInvokeBody + 1)
	write("FuzzDecodeInvokeRequest", "hugebody", e.b)
}

func FuzzDecodeInvokeRequest(f *testing.F) {
	f.Add(payloadOf(seedFrames()["invokereq"]))
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := DecodeInvokeRequest(p)
		if err != nil {
			return
		}
		if checkInvokeRequest(r) != nil {
			t.Fatalf("decoded a request the sender would refuse: %+v", r)
		}
		checkPayload(t, TypeInvokeReq, p)
	})
}

func FuzzDecodeInvokeResponse(f *testing.F) {
	f.Add(payloadOf(seedFrames()["invokeresp"]))
	f.Add(payloadOf(seedFrames()["invokestage"]))
	f.Fuzz(func(t *testing.T, p []byte) { checkPayload(t, TypeInvokeResp, p) })
}

// TestInvokeResponseStageSeed: the stage seed travels as an optional
// trailer; a response without it is the same bytes as before the field,
// and an empty trailer is refused (it would not re-encode).
func TestInvokeResponseStageSeed(t *testing.T) {
	r := InvokeResponse{Status: 200, Kind: KindFork, Child: "c-1", Body: []byte("x")}
	plain := r.Encode()
	r.Seed = "a/s-9"
	staged := r.Encode()
	if len(staged) != len(plain)+2+len(r.Seed) {
		t.Fatalf("stage seed trailer: %d bytes, want %d", len(staged)-len(plain), 2+len(r.Seed))
	}
	got, err := DecodeInvokeResponse(staged)
	if err != nil || got.Seed != "a/s-9" {
		t.Fatalf("decode with seed: %+v %v", got, err)
	}
	if got, err := DecodeInvokeResponse(plain); err != nil || got.Seed != "" {
		t.Fatalf("decode without seed: %+v %v", got, err)
	}
	if _, err := DecodeInvokeResponse(append(plain, 0, 0)); err == nil {
		t.Fatal("an empty stage seed trailer decoded")
	}
}
