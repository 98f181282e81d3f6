package transport

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
)

// HMAC labels; distinct labels keep a client proof from being replayed as
// a server proof and vice versa.
const (
	clientLabel = "mitosis-auth-v1"
	serverLabel = "mitosis-auth-v1-server"
)

// authMAC computes HMAC-SHA256(secret, label || nonce || name).
func authMAC(secret []byte, label string, nonce *[NonceSize]byte, name string) [MACSize]byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(label))
	m.Write(nonce[:])
	m.Write([]byte(name))
	var out [MACSize]byte
	copy(out[:], m.Sum(nil))
	return out
}

func newNonce() ([NonceSize]byte, error) {
	var n [NonceSize]byte
	if _, err := rand.Read(n[:]); err != nil {
		return n, fmt.Errorf("transport: random challenge: %w", err)
	}
	return n, nil
}

// writeFrame writes one frame with a single vectored write where the
// connection supports it. Callers serialize writes on a connection.
func writeFrame(w io.Writer, typ uint8, id uint64, payload []byte) error {
	var h [HeaderSize]byte
	putHeader(h[:], typ, id, len(payload))
	if len(payload) == 0 {
		_, err := w.Write(h[:])
		return err
	}
	if len(payload) <= 512 {
		b := make([]byte, 0, HeaderSize+len(payload))
		b = append(append(b, h[:]...), payload...)
		_, err := w.Write(b)
		return err
	}
	bufs := net.Buffers{h[:], payload}
	_, err := bufs.WriteTo(w)
	return err
}

func writeError(w io.Writer, id uint64, code uint16, msg string) error {
	m := ErrorMsg{Code: code, Msg: msg}
	return writeFrame(w, TypeError, id, m.Encode())
}

// readHandshakeFrame reads a handshake frame of type want; an Error frame
// becomes a *RemoteError.
func readHandshakeFrame(r io.Reader, want uint8) ([]byte, error) {
	f, err := ReadFrame(r, maxSmallFrame)
	if err != nil {
		return nil, err
	}
	if f.Type == TypeError {
		m, err := DecodeError(f.Payload)
		if err != nil {
			return nil, err
		}
		return nil, &RemoteError{Code: m.Code, Msg: m.Msg}
	}
	if f.Type != want || f.ID != 0 {
		return nil, fmt.Errorf("%w: handshake expected frame type %d id 0, got type %d id %d",
			ErrMalformed, want, f.Type, f.ID)
	}
	return f.Payload, nil
}

// serverHandshake authenticates a client on conn. It returns the client's
// node name. On authentication failure it sends an Error frame and returns
// an error wrapping ErrAuth; the caller closes conn.
func serverHandshake(conn io.ReadWriter, br *bufio.Reader, cfg *Config) (string, error) {
	sn, err := newNonce()
	if err != nil {
		return "", err
	}
	ch := Challenge{Version: ProtocolVersion, Nonce: sn}
	if err := writeFrame(conn, TypeChallenge, 0, ch.Encode()); err != nil {
		return "", fmt.Errorf("send challenge: %w", err)
	}
	p, err := readHandshakeFrame(br, TypeHello)
	if err != nil {
		if errors.Is(err, ErrMalformed) || errors.Is(err, ErrTooLarge) {
			_ = writeError(conn, 0, CodeMalformed, err.Error())
		}
		return "", fmt.Errorf("read hello: %w", err)
	}
	h, err := DecodeHello(p)
	if err != nil {
		_ = writeError(conn, 0, CodeMalformed, err.Error())
		return "", err
	}
	if h.Version != ProtocolVersion {
		_ = writeError(conn, 0, CodeUnsupported, fmt.Sprintf("protocol version %d not supported (want %d)", h.Version, ProtocolVersion))
		return "", fmt.Errorf("%w: client %q speaks protocol version %d", ErrUnsupported, h.Name, h.Version)
	}
	if len(cfg.Secret) > 0 {
		want := authMAC(cfg.Secret, clientLabel, &sn, h.Name)
		if !hmac.Equal(want[:], h.MAC[:]) {
			_ = writeError(conn, 0, CodeAuth, "authentication failed")
			return "", fmt.Errorf("%w: client %q did not prove the cluster secret", ErrAuth, h.Name)
		}
	}
	a := Auth{Name: cfg.Node, MAC: authMAC(cfg.Secret, serverLabel, &h.Nonce, cfg.Node)}
	if err := writeFrame(conn, TypeAuth, 0, a.Encode()); err != nil {
		return "", fmt.Errorf("send auth: %w", err)
	}
	return h.Name, nil
}

// clientHandshake authenticates the server on conn and proves the secret
// to it. It returns the server's node name.
func clientHandshake(conn io.ReadWriter, br *bufio.Reader, cfg *Config) (string, error) {
	p, err := readHandshakeFrame(br, TypeChallenge)
	if err != nil {
		return "", fmt.Errorf("read challenge: %w", err)
	}
	ch, err := DecodeChallenge(p)
	if err != nil {
		return "", err
	}
	if ch.Version != ProtocolVersion {
		return "", fmt.Errorf("%w: server speaks protocol version %d", ErrUnsupported, ch.Version)
	}
	cn, err := newNonce()
	if err != nil {
		return "", err
	}
	h := Hello{
		Version: ProtocolVersion,
		Name:    cfg.Node,
		MAC:     authMAC(cfg.Secret, clientLabel, &ch.Nonce, cfg.Node),
		Nonce:   cn,
	}
	if err := writeFrame(conn, TypeHello, 0, h.Encode()); err != nil {
		return "", fmt.Errorf("send hello: %w", err)
	}
	p, err = readHandshakeFrame(br, TypeAuth)
	if err != nil {
		var re *RemoteError
		if errors.As(err, &re) && re.Code == CodeAuth {
			return "", fmt.Errorf("%w: server refused our cluster secret", ErrAuth)
		}
		return "", fmt.Errorf("read auth: %w", err)
	}
	a, err := DecodeAuth(p)
	if err != nil {
		return "", err
	}
	if len(cfg.Secret) > 0 {
		want := authMAC(cfg.Secret, serverLabel, &cn, a.Name)
		if !hmac.Equal(want[:], a.MAC[:]) {
			_ = writeError(conn, 0, CodeAuth, "authentication failed")
			return "", fmt.Errorf("%w: server %q did not prove the cluster secret", ErrAuth, a.Name)
		}
	}
	return a.Name, nil
}
