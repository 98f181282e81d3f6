package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mapping is one line of /proc/PID/maps.
type Mapping struct {
	// Start and End delimit the mapping: [Start, End).
	Start, End uint64
	// Perms is the permission column, e.g. "r-xp".
	Perms string
	// Prot holds the unix.PROT_READ, PROT_WRITE and PROT_EXEC bits of Perms.
	Prot uint32
	// Shared is true for MAP_SHARED mappings ('s' in Perms).
	Shared bool
	// Offset is the file offset of Start.
	Offset uint64
	// Dev is unix.Mkdev(major, minor) of the mapped file's device.
	Dev uint64
	// Inode is the mapped file's inode number, 0 for anonymous memory.
	Inode uint64
	// Path is the mapped file's path or a pseudo name: "", "[heap]",
	// "[stack]", "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]",
	// "[anon:name]"... A trailing " (deleted)" is stripped (see Deleted).
	Path string
	// Deleted is true when the kernel marked the path " (deleted)".
	Deleted bool
}

// Len returns End-Start.
func (m Mapping) Len() uint64 { return m.End - m.Start }

// deletedSuffix is what the kernel appends to the path of an unlinked file.
const deletedSuffix = " (deleted)"

// Maps reads and parses /proc/PID/maps.
func Maps(pid int) ([]Mapping, error) {
	data, err := os.ReadFile(procPath(pid, "maps"))
	if err != nil {
		return nil, fmt.Errorf("read maps of %d: %w", pid, err)
	}
	ms, err := ParseMaps(data)
	if err != nil {
		return nil, fmt.Errorf("maps of %d: %w", pid, err)
	}
	return ms, nil
}

// ParseMaps parses the contents of a /proc/PID/maps file. It is strict: any
// malformed line makes it fail with an error naming the line. Paths may
// contain spaces. Empty input yields no mappings.
func ParseMaps(data []byte) ([]Mapping, error) {
	var ms []Mapping
	lineNo := 0
	for len(data) > 0 {
		lineNo++
		var line []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			line, data = data, nil
		}
		m, err := parseMapsLine(string(line))
		if err != nil {
			return nil, fmt.Errorf("maps line %d %q: %w", lineNo, truncate(string(line), 200), err)
		}
		ms = append(ms, m)
	}
	return ms, nil
}

// parseMapsLine parses one line (without its newline), whose format is
// "start-end perms offset major:minor inode [padding path]".
func parseMapsLine(line string) (Mapping, error) {
	var m Mapping
	rest := line
	field := func(name string) (string, error) {
		i := strings.IndexByte(rest, ' ')
		if i < 0 {
			return "", fmt.Errorf("missing %s", name)
		}
		f := rest[:i]
		rest = rest[i+1:]
		if f == "" {
			return "", fmt.Errorf("empty %s", name)
		}
		return f, nil
	}

	rng, err := field("address range")
	if err != nil {
		return m, err
	}
	lo, hi, ok := strings.Cut(rng, "-")
	if !ok {
		return m, fmt.Errorf("bad address range %q", rng)
	}
	if m.Start, err = parseHex(lo, "start"); err != nil {
		return m, err
	}
	if m.End, err = parseHex(hi, "end"); err != nil {
		return m, err
	}
	if m.Start >= m.End {
		return m, fmt.Errorf("empty or inverted range %#x-%#x", m.Start, m.End)
	}

	if m.Perms, err = field("perms"); err != nil {
		return m, err
	}
	if m.Prot, m.Shared, err = parsePerms(m.Perms); err != nil {
		return m, err
	}

	off, err := field("offset")
	if err != nil {
		return m, err
	}
	if m.Offset, err = parseHex(off, "offset"); err != nil {
		return m, err
	}

	dev, err := field("device")
	if err != nil {
		return m, err
	}
	maj, mnr, ok := strings.Cut(dev, ":")
	if !ok {
		return m, fmt.Errorf("bad device %q", dev)
	}
	major, err := strconv.ParseUint(maj, 16, 32)
	if err != nil {
		return m, fmt.Errorf("bad device major %q: %w", maj, err)
	}
	minor, err := strconv.ParseUint(mnr, 16, 32)
	if err != nil {
		return m, fmt.Errorf("bad device minor %q: %w", mnr, err)
	}
	m.Dev = unix.Mkdev(uint32(major), uint32(minor))

	// The inode is the last fixed field: it is followed by a space and the
	// padded path, or (older kernels, anonymous memory) by the end of line.
	ino := rest
	rest = ""
	if i := strings.IndexByte(ino, ' '); i >= 0 {
		ino, rest = ino[:i], ino[i+1:]
	}
	if m.Inode, err = strconv.ParseUint(ino, 10, 64); err != nil {
		return m, fmt.Errorf("bad inode %q: %w", ino, err)
	}

	m.Path = strings.TrimLeft(rest, " ")
	if p, ok := strings.CutSuffix(m.Path, deletedSuffix); ok {
		m.Path, m.Deleted = p, true
	}
	return m, nil
}

// parsePerms decodes a 4-character permission column such as "rw-p".
func parsePerms(p string) (prot uint32, shared bool, err error) {
	if len(p) != 4 {
		return 0, false, fmt.Errorf("bad perms %q", p)
	}
	bits := [3]struct {
		c    byte
		prot uint32
	}{{'r', unix.PROT_READ}, {'w', unix.PROT_WRITE}, {'x', unix.PROT_EXEC}}
	for i, b := range bits {
		switch p[i] {
		case b.c:
			prot |= b.prot
		case '-':
		default:
			return 0, false, fmt.Errorf("bad perms %q", p)
		}
	}
	switch p[3] {
	case 's':
		shared = true
	case 'p':
	default:
		return 0, false, fmt.Errorf("bad perms %q", p)
	}
	return prot, shared, nil
}

// parseHex parses a non-empty unsigned 64-bit hexadecimal number without
// prefix or sign.
func parseHex(s, what string) (uint64, error) {
	if s == "" || s[0] == '+' || s[0] == '-' {
		return 0, fmt.Errorf("bad %s %q", what, s)
	}
	v, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("bad %s %q: %w", what, s, err)
	}
	return v, nil
}

// truncate shortens s to at most n bytes for error messages.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
