// Package image unpacks function images. An image is a root filesystem
// directory; as a convenience an OCI image layout (the directory form of
// `skopeo copy ... oci:DIR` or `docker save` converted to OCI) is unpacked
// into one: its manifest's layers are applied in order, honouring whiteouts.
package image

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Annotations map[string]string `json:"annotations"`
}

type index struct {
	Manifests []descriptor `json:"manifests"`
}

type manifest struct {
	Layers []descriptor `json:"layers"`
}

// refAnnotation names a manifest in index.json.
const refAnnotation = "org.opencontainers.image.ref.name"

// UnpackOCI unpacks the image ref ("" for the only/first manifest) of the
// OCI image layout at layout into dest, which must not exist yet.
func UnpackOCI(layout, ref, dest string) error {
	var idx index
	if err := readJSON(filepath.Join(layout, "index.json"), &idx); err != nil {
		return fmt.Errorf("oci layout %s: %w", layout, err)
	}
	var md *descriptor
	for i := range idx.Manifests {
		if ref == "" || idx.Manifests[i].Annotations[refAnnotation] == ref {
			md = &idx.Manifests[i]
			break
		}
	}
	if md == nil {
		return fmt.Errorf("oci layout %s: no manifest named %q in index.json", layout, ref)
	}
	var m manifest
	if err := readJSON(blobPath(layout, md.Digest), &m); err != nil {
		return fmt.Errorf("oci layout %s: manifest %s: %w", layout, md.Digest, err)
	}
	if _, err := os.Lstat(dest); err == nil {
		return fmt.Errorf("unpack into %s: it already exists", dest)
	}
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return err
	}
	for _, l := range m.Layers {
		if err := applyLayer(blobPath(layout, l.Digest), l.MediaType, dest); err != nil {
			return fmt.Errorf("layer %s: %w", l.Digest, err)
		}
	}
	return nil
}

// noLinkedParents refuses an entry whose parent directories inside dest
// include a symlink: writing through it could land outside the image.
func noLinkedParents(dest, name string) error {
	p := dest
	parts := strings.Split(strings.Trim(filepath.Dir(name), "/"), "/")
	for _, part := range parts {
		if part == "" {
			continue
		}
		p = filepath.Join(p, part)
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("its parent %s is a symlink in the image: refused", strings.TrimPrefix(p, dest))
		}
	}
	return nil
}

func blobPath(layout, digest string) string {
	algo, hex, _ := strings.Cut(digest, ":")
	return filepath.Join(layout, "blobs", algo, hex)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// applyLayer extracts one layer tarball into dest. Entries are confined to
// dest (no "..", absolute paths or links escaping it); ".wh.NAME" removes
// NAME and ".wh..wh..opq" empties its directory (OCI whiteouts).
func applyLayer(path, mediaType, dest string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var r io.Reader = f
	if strings.HasSuffix(mediaType, "gzip") {
		gz, err := gzip.NewReader(f)
		if err != nil {
			return err
		}
		defer gz.Close()
		r = gz
	}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Clean("/" + h.Name)
		target := filepath.Join(dest, name)
		if err := noLinkedParents(dest, name); err != nil {
			return fmt.Errorf("entry %q: %w", h.Name, err)
		}
		dir, base := filepath.Split(target)
		switch {
		case base == ".wh..wh..opq":
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
					return err
				}
			}
			continue
		case strings.HasPrefix(base, ".wh."):
			if err := os.RemoveAll(filepath.Join(dir, strings.TrimPrefix(base, ".wh."))); err != nil {
				return err
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		mode := os.FileMode(h.Mode & 0o7777)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, mode); err != nil {
				return err
			}
		case tar.TypeReg:
			_ = os.RemoveAll(target)
			out, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
			if err != nil {
				return err
			}
			if _, err := io.Copy(out, tr); err != nil {
				out.Close()
				return err
			}
			if err := out.Close(); err != nil {
				return err
			}
		case tar.TypeSymlink:
			_ = os.RemoveAll(target)
			if err := os.Symlink(h.Linkname, target); err != nil {
				return err
			}
		case tar.TypeLink:
			src := filepath.Join(dest, filepath.Clean("/"+h.Linkname))
			_ = os.RemoveAll(target)
			if err := os.Link(src, target); err != nil {
				return err
			}
		default:
			// Devices, fifos: not needed by function images; skipped.
			continue
		}
		_ = os.Lchown(target, h.Uid, h.Gid)
	}
}
