// Package image builds container images offline, with no registry and no
// container daemon, into OCI archives: a tar of an OCI image layout
// (oci-layout, index.json, blobs/sha256/...) whose index.json names the
// image the way `ctr -n k8s.io images import` (containerd) reads it, plus
// the manifest.json of `docker save` for `docker load` (the layout of
// Docker 25's docker save).
//
// Images are built from files (host paths or bytes) and a config, in one
// or a few gzip layers, reproducibly: every timestamp is Spec.Created (the
// Unix epoch by default), entries are sorted, owners are uid/gid 0 unless a
// file says otherwise, and nothing of the host (user names, mtimes, umask)
// leaks in; the same inputs give the same bytes and so the same digest.
//
// images.go defines the egressnat images: the product image (the Dockerfile
// at the repository root describes the same image for docker users), a
// pause image and the netutil test image; cmd/mkimage is their command line.
package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations of the image's entry in index.json.
const (
	// AnnotationRefName is the OCI tag of the image ("v0.1.0").
	AnnotationRefName = "org.opencontainers.image.ref.name"
	// AnnotationImageName is the full name containerd gives the image
	// on import ("ghcr.io/egressnat/egressnat:v0.1.0").
	AnnotationImageName = "io.containerd.image.name"
)

// File is one entry of a layer: a regular file or a directory.
type File struct {
	// Path is the absolute path in the image, e.g. "/etc/passwd".
	Path string
	// Source is the host file to copy; when empty the content is Data.
	// Only its content is used: mode, owner and times come from here.
	Source string
	Data   []byte
	// Mode holds the permission bits (0644 for a file, 0755 for a
	// directory when zero) plus fs.ModeDir for a directory and
	// fs.ModeSetuid, fs.ModeSetgid or fs.ModeSticky.
	Mode fs.FileMode
	// UID and GID own the entry; 0 (root) by default.
	UID, GID int
}

// Layer is one layer of an image.
type Layer struct {
	// Comment is the layer's history entry (created_by).
	Comment string
	Files   []File
}

// Config is the image's runtime configuration.
type Config struct {
	Entrypoint []string
	Cmd        []string
	// User is "uid", "uid:gid" or a name from the image's /etc/passwd.
	User string
	// Env entries are "KEY=value".
	Env        []string
	WorkingDir string
	Labels     map[string]string
	// ExposedPorts entries are "8080/tcp", "8080/udp".
	ExposedPorts []string
	StopSignal   string
}

// Spec describes an image and where to write it.
type Spec struct {
	// Name is the full reference with a registry host and a tag,
	// e.g. "ghcr.io/egressnat/egressnat:v0.1.0".
	Name   string
	Layers []Layer
	Config Config
	// OS and Arch are the platform; "linux" and runtime.GOARCH when empty.
	OS, Arch string
	// Created is the time of the config, history and every file;
	// the Unix epoch when zero.
	Created time.Time
	// Output is the OCI archive to write (replaced atomically).
	Output string
}

// Result is what Build wrote.
type Result struct {
	Name string
	// Tag is Name's tag, the index's org.opencontainers.image.ref.name.
	Tag string
	// Path is the archive.
	Path string
	// Digest is the image manifest's digest ("sha256:...").
	Digest string
	// Size is the archive's size in bytes.
	Size int64
}

// Build writes the image spec describes to spec.Output as an OCI archive.
func Build(spec Spec) (Result, error) {
	tag, err := tagOf(spec.Name)
	if err != nil {
		return Result{}, err
	}
	if spec.Output == "" {
		return Result{}, errors.New("build: no output path")
	}
	created := spec.Created
	if created.IsZero() {
		created = time.Unix(0, 0)
	}
	created = created.UTC().Truncate(time.Second)
	osName, arch := spec.OS, spec.Arch
	if osName == "" {
		osName = "linux"
	}
	if arch == "" {
		arch = runtime.GOARCH
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for i, l := range spec.Layers {
		blob, err := layerBlob(l.Files, created)
		if err != nil {
			return Result{}, fmt.Errorf("layer %d: %w", i, err)
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(blob)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return Result{}, fmt.Errorf("layer %d: %w", i, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer:     layer,
			MediaType: types.OCILayer,
			History:   v1.History{Created: v1.Time{Time: created}, CreatedBy: l.Comment},
		})
		if err != nil {
			return Result{}, fmt.Errorf("append layer %d: %w", i, err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return Result{}, fmt.Errorf("config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = osName, arch
	cf.Created = v1.Time{Time: created}
	c := spec.Config
	cf.Config = v1.Config{
		Entrypoint: slices.Clone(c.Entrypoint),
		Cmd:        slices.Clone(c.Cmd),
		User:       c.User,
		Env:        slices.Clone(c.Env),
		WorkingDir: c.WorkingDir,
		StopSignal: c.StopSignal,
	}
	if len(c.Labels) > 0 {
		cf.Config.Labels = map[string]string{}
		for k, v := range c.Labels {
			cf.Config.Labels[k] = v
		}
	}
	if len(c.ExposedPorts) > 0 {
		cf.Config.ExposedPorts = map[string]struct{}{}
		for _, p := range c.ExposedPorts {
			if !strings.Contains(p, "/") {
				p += "/tcp"
			}
			cf.Config.ExposedPorts[p] = struct{}{}
		}
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return Result{}, fmt.Errorf("config: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return Result{}, fmt.Errorf("digest: %w", err)
	}

	dir, err := os.MkdirTemp("", "oci-layout-")
	if err != nil {
		return Result{}, fmt.Errorf("layout dir: %w", err)
	}
	defer os.RemoveAll(dir)
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return Result{}, fmt.Errorf("write layout: %w", err)
	}
	err = lp.AppendImage(img,
		layout.WithAnnotations(map[string]string{
			AnnotationRefName:   tag,
			AnnotationImageName: spec.Name,
		}),
		layout.WithPlatform(v1.Platform{OS: osName, Architecture: arch}))
	if err != nil {
		return Result{}, fmt.Errorf("write image: %w", err)
	}
	if err := writeDockerManifest(lp, img, spec.Name); err != nil {
		return Result{}, err
	}
	size, err := writeArchive(dir, spec.Output, created)
	if err != nil {
		return Result{}, err
	}
	return Result{Name: spec.Name, Tag: tag, Path: spec.Output, Digest: digest.String(), Size: size}, nil
}

// writeDockerManifest adds manifest.json, the index of `docker save`'s
// archives, which `docker load` reads (docker save has written both it
// and index.json since Docker 25): the config and layers by their blob
// paths and the name.
func writeDockerManifest(lp layout.Path, img v1.Image, name string) error {
	blob := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }
	cfg, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("docker manifest: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("docker manifest: %w", err)
	}
	m := []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}{{Config: blob(cfg), RepoTags: []string{name}}}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return fmt.Errorf("docker manifest: %w", err)
		}
		m[0].Layers = append(m[0].Layers, blob(d))
	}
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("docker manifest: %w", err)
	}
	if err := lp.WriteFile("manifest.json", b, 0o644); err != nil {
		return fmt.Errorf("docker manifest: %w", err)
	}
	return nil
}

// tagOf checks that name is a full reference (registry host, repository,
// tag) and returns its tag.
func tagOf(name string) (string, error) {
	i := strings.LastIndex(name, ":")
	if i < 0 || strings.Contains(name[i:], "/") || strings.Contains(name, "@") {
		return "", fmt.Errorf("image name %q: want host/repository:tag", name)
	}
	repo, tag := name[:i], name[i+1:]
	host, rest, ok := strings.Cut(repo, "/")
	if !ok || rest == "" || !(strings.ContainsAny(host, ".:") || host == "localhost") {
		return "", fmt.Errorf("image name %q: want a registry host first (e.g. ghcr.io/...)", name)
	}
	if !validTag(tag) {
		return "", fmt.Errorf("image name %q: bad tag %q", name, tag)
	}
	for _, c := range rest {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.ContainsRune("._-/", c)) {
			return "", fmt.Errorf("image name %q: bad repository %q", name, rest)
		}
	}
	return tag, nil
}

// validTag: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}, the OCI distribution grammar.
func validTag(tag string) bool {
	if tag == "" || len(tag) > 128 || tag[0] == '.' || tag[0] == '-' {
		return false
	}
	for _, c := range tag {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("_.-", c)) {
			return false
		}
	}
	return true
}

// entry is a File with its tar name ("etc/passwd", "etc/").
type entry struct {
	name string
	f    File
}

// layerBlob returns the gzip-compressed tar of files: sorted by path,
// missing parent directories added (0755, root), every time mtime.
func layerBlob(files []File, mtime time.Time) ([]byte, error) {
	byPath := map[string]File{}
	for _, f := range files {
		if !path.IsAbs(f.Path) {
			return nil, fmt.Errorf("file %q: path not absolute", f.Path)
		}
		p := path.Clean(f.Path)
		if p == "/" {
			return nil, errors.New("file /: the root is implicit")
		}
		if _, dup := byPath[p]; dup {
			return nil, fmt.Errorf("file %s: listed twice", p)
		}
		if f.Mode.IsDir() && (f.Source != "" || f.Data != nil) {
			return nil, fmt.Errorf("file %s: a directory with content", p)
		}
		if f.Mode&^(fs.ModePerm|fs.ModeDir|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0 {
			return nil, fmt.Errorf("file %s: mode %v: only regular files and directories", p, f.Mode)
		}
		byPath[p] = f
	}
	for p := range byPath {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if f, ok := byPath[d]; ok {
				if !f.Mode.IsDir() {
					return nil, fmt.Errorf("file %s: parent %s is not a directory", p, d)
				}
				continue
			}
			byPath[d] = File{Path: d, Mode: fs.ModeDir | 0o755}
		}
	}
	entries := make([]entry, 0, len(byPath))
	for p, f := range byPath {
		name := strings.TrimPrefix(p, "/")
		if f.Mode.IsDir() {
			name += "/"
		}
		entries = append(entries, entry{name, f})
	}
	slices.SortFunc(entries, func(a, b entry) int { return strings.Compare(a.name, b.name) })

	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		if err := writeEntry(tw, e, mtime); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("close gzip: %w", err)
	}
	return buf.Bytes(), nil
}

func writeEntry(tw *tar.Writer, e entry, mtime time.Time) error {
	f := e.f
	perm := f.Mode.Perm()
	if perm == 0 {
		perm = 0o644
		if f.Mode.IsDir() {
			perm = 0o755
		}
	}
	mode := int64(perm)
	if f.Mode&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if f.Mode&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if f.Mode&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	hdr := &tar.Header{
		Name:    e.name,
		Mode:    mode,
		Uid:     f.UID,
		Gid:     f.GID,
		ModTime: mtime,
	}
	if f.Mode.IsDir() {
		hdr.Typeflag = tar.TypeDir
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("tar %s: %w", e.name, err)
		}
		return nil
	}
	hdr.Typeflag = tar.TypeReg
	var r io.Reader = bytes.NewReader(f.Data)
	hdr.Size = int64(len(f.Data))
	if f.Source != "" {
		src, err := os.Open(f.Source)
		if err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		defer src.Close()
		st, err := src.Stat()
		if err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("file %s: source %s is not a regular file", f.Path, f.Source)
		}
		r, hdr.Size = src, st.Size()
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("tar %s: %w", e.name, err)
	}
	n, err := io.Copy(tw, r)
	if err != nil {
		return fmt.Errorf("tar %s: %w", e.name, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("tar %s: source changed size while copied", e.name)
	}
	return nil
}

// writeArchive tars the layout in dir to out (sorted, root-owned, every
// time mtime) through a temporary file renamed into place.
func writeArchive(dir, out string, mtime time.Time) (int64, error) {
	var names []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			names = append(names, p)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("walk layout: %w", err)
	}
	slices.Sort(names)
	if d := filepath.Dir(out); d != "" {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return 0, fmt.Errorf("output dir: %w", err)
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*")
	if err != nil {
		return 0, fmt.Errorf("output: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	tw := tar.NewWriter(tmp)
	for _, p := range names {
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return 0, err
		}
		st, err := os.Stat(p)
		if err != nil {
			return 0, fmt.Errorf("layout: %w", err)
		}
		hdr := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, ModTime: mtime, Typeflag: tar.TypeReg}
		if st.IsDir() {
			hdr.Name += "/"
			hdr.Mode, hdr.Typeflag = 0o755, tar.TypeDir
		} else {
			hdr.Size = st.Size()
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return 0, fmt.Errorf("archive %s: %w", rel, err)
		}
		if st.IsDir() {
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			return 0, fmt.Errorf("layout: %w", err)
		}
		_, err = io.Copy(tw, f)
		f.Close()
		if err != nil {
			return 0, fmt.Errorf("archive %s: %w", rel, err)
		}
	}
	if err := tw.Close(); err != nil {
		return 0, fmt.Errorf("archive: %w", err)
	}
	st, err := tmp.Stat()
	if err != nil {
		return 0, fmt.Errorf("archive: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return 0, fmt.Errorf("archive: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return 0, fmt.Errorf("archive: %w", err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return 0, fmt.Errorf("archive: %w", err)
	}
	return st.Size(), nil
}

// ReadArchive unpacks the OCI archive to dir (created if missing) and
// returns the layout there, for layout.Path's readers (ImageIndex, Image).
func ReadArchive(archive, dir string) (layout.Path, error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", fmt.Errorf("read archive: %w", err)
	}
	defer f.Close()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("read archive: %w", err)
	}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("read archive: %w", err)
		}
		name := path.Clean(hdr.Name)
		if !fs.ValidPath(name) {
			return "", fmt.Errorf("read archive: bad entry %q", hdr.Name)
		}
		p := filepath.Join(dir, filepath.FromSlash(name))
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return "", fmt.Errorf("read archive: %w", err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return "", fmt.Errorf("read archive: %w", err)
			}
			out, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return "", fmt.Errorf("read archive: %w", err)
			}
			_, err = io.Copy(out, tr)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return "", fmt.Errorf("read archive: %w", err)
			}
		default:
			return "", fmt.Errorf("read archive: entry %q of type %c", hdr.Name, hdr.Typeflag)
		}
	}
	lp, err := layout.FromPath(dir)
	if err != nil {
		return "", fmt.Errorf("read archive: %w", err)
	}
	return lp, nil
}
