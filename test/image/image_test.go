package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/egressnat/egressnat/test/deploy"
)

// Size bounds of the archives (bytes), a little above what was measured
// (go1.26.8, linux/amd64): product 36,654,080 (34.96 MiB, with egressnatctl
// on cobra and k8s.io/cli-runtime; 32,152,064 before),
// pause 748,032 (0.71 MiB), netutil 1,070,592 (1.02 MiB).
// A crossing means the binaries grew (a new dependency?) or compression
// is gone.
const (
	maxProductSize = 40 << 20
	maxPauseSize   = 850 << 10
	maxNetutilSize = 1200 << 10
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// productBins builds the three binaries once for the package's tests, as
// make image does (static, -trimpath, -s -w).
func productBins(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the product binaries (skipped under -short)")
	}
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "egressnat-image-test-")
		if binErr == nil {
			binErr = GoBuild(context.Background(), "", binDir, "", modulePath+"/cmd/...")
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range []string{binDir, fakeDir} {
		if d != "" {
			os.RemoveAll(d)
		}
	}
	os.Exit(code)
}

// archiveInfo is an archive read back with the layout package.
type archiveInfo struct {
	size   int64
	desc   v1.Descriptor // index.json's entry
	img    v1.Image
	config *v1.ConfigFile
	// files are the layers' entries by absolute path (later layers win);
	// data holds the content of regular files.
	files map[string]*tar.Header
	data  map[string][]byte
}

func readBack(t *testing.T, archive string) *archiveInfo {
	t.Helper()
	st, err := os.Stat(archive)
	if err != nil {
		t.Fatal(err)
	}
	// The archive is a plain tar of the layout: oci-layout first.
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
		if hdr.Uid != 0 || hdr.Gid != 0 || !hdr.ModTime.Equal(time.Unix(0, 0)) {
			t.Errorf("archive entry %s: owner %d:%d, mtime %v; want 0:0 and the epoch", hdr.Name, hdr.Uid, hdr.Gid, hdr.ModTime)
		}
	}
	f.Close()
	for _, want := range []string{"oci-layout", "index.json", "manifest.json", "blobs/sha256/"} {
		if !slices.Contains(names, want) {
			t.Errorf("archive lacks %s: %v", want, names)
		}
	}
	if !slices.IsSorted(names) {
		t.Errorf("archive entries not sorted: %v", names)
	}

	dir := t.TempDir()
	lp, err := ReadArchive(archive, dir)
	if err != nil {
		t.Fatal(err)
	}
	ii, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := ii.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if im.MediaType != types.OCIImageIndex || len(im.Manifests) != 1 {
		t.Fatalf("index.json: media type %s, %d manifests; want one OCI image", im.MediaType, len(im.Manifests))
	}
	info := &archiveInfo{size: st.Size(), desc: im.Manifests[0], files: map[string]*tar.Header{}, data: map[string][]byte{}}
	if info.desc.MediaType != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %s", info.desc.MediaType)
	}
	info.img, err = ii.Image(info.desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(info.img); err != nil {
		t.Errorf("validate: %v", err)
	}
	info.config, err = info.img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	// docker load's manifest.json: the same config and layers.
	var dm []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if b, err := os.ReadFile(filepath.Join(dir, "manifest.json")); err != nil {
		t.Error(err)
	} else if err := json.Unmarshal(b, &dm); err != nil || len(dm) != 1 {
		t.Errorf("manifest.json: %s, %v", b, err)
	} else {
		m, _ := info.img.Manifest()
		want := []string{"blobs/sha256/" + m.Config.Digest.Hex}
		for _, l := range m.Layers {
			want = append(want, "blobs/sha256/"+l.Digest.Hex)
		}
		if got := append([]string{dm[0].Config}, dm[0].Layers...); !slices.Equal(got, want) ||
			!slices.Equal(dm[0].RepoTags, []string{info.desc.Annotations[AnnotationImageName]}) {
			t.Errorf("manifest.json %+v, want blobs %v", dm[0], want)
		}
	}
	layers, err := info.img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if mt, _ := l.MediaType(); mt != types.OCILayer {
			t.Errorf("layer %d: media type %s, want %s", i, mt, types.OCILayer)
		}
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		var prev string
		tr := tar.NewReader(rc)
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %d: %v", i, err)
			}
			if hdr.Name <= prev {
				t.Errorf("layer %d: %s after %s, want sorted entries", i, hdr.Name, prev)
			}
			prev = hdr.Name
			if !hdr.ModTime.Equal(time.Unix(0, 0)) || hdr.Uname != "" || hdr.Gname != "" {
				t.Errorf("layer %d: %s: mtime %v, owner names %q:%q", i, hdr.Name, hdr.ModTime, hdr.Uname, hdr.Gname)
			}
			p := "/" + strings.TrimSuffix(hdr.Name, "/")
			info.files[p] = hdr
			if hdr.Typeflag == tar.TypeReg {
				b, err := io.ReadAll(tr)
				if err != nil {
					t.Fatal(err)
				}
				info.data[p] = b
			}
		}
		rc.Close()
	}
	return info
}

// checkCommon: the index names the image for containerd, the platform is
// set, the base files are there and every listed binary is a root-owned
// executable static ELF of the image's architecture.
func checkCommon(t *testing.T, info *archiveInfo, name string, bins []string, maxSize int64) {
	t.Helper()
	tag := name[strings.LastIndex(name, ":")+1:]
	if got := info.desc.Annotations[AnnotationRefName]; got != tag {
		t.Errorf("%s = %q, want %q", AnnotationRefName, got, tag)
	}
	if got := info.desc.Annotations[AnnotationImageName]; got != name {
		t.Errorf("%s = %q, want %q", AnnotationImageName, got, name)
	}
	if p := info.desc.Platform; p == nil || p.OS != "linux" || p.Architecture != info.config.Architecture {
		t.Errorf("index platform %+v, config %s/%s", p, info.config.OS, info.config.Architecture)
	}
	if !info.config.Created.Equal(time.Unix(0, 0)) {
		t.Errorf("created %v, want the epoch", info.config.Created)
	}
	passwd := string(info.data["/etc/passwd"])
	if !strings.Contains(passwd, "\nnonroot:x:65532:65532:") || !strings.HasPrefix(passwd, "root:x:0:0:") {
		t.Errorf("/etc/passwd lacks root or nonroot 65532:\n%s", passwd)
	}
	if group := string(info.data["/etc/group"]); !strings.Contains(group, "\nnonroot:x:65532:") {
		t.Errorf("/etc/group lacks nonroot 65532:\n%s", group)
	}
	if h := info.files["/tmp"]; h == nil || h.Typeflag != tar.TypeDir || h.Mode != 0o1777 {
		t.Errorf("/tmp: %+v, want a directory 1777", h)
	}
	if h := info.files["/home/nonroot"]; h == nil || h.Uid != NonrootUID || h.Gid != NonrootUID {
		t.Errorf("/home/nonroot: %+v, want owned by nonroot", h)
	}
	for _, sh := range []string{"/bin/sh", "/bin/bash", "/bin/busybox"} {
		if info.files[sh] != nil {
			t.Errorf("%s in the image, want no shell", sh)
		}
	}
	for _, b := range bins {
		h := info.files[b]
		if h == nil {
			t.Errorf("%s missing", b)
			continue
		}
		if h.Typeflag != tar.TypeReg || h.Mode != 0o755 || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: type %c mode %o owner %d:%d, want a root-owned 0755 file", b, h.Typeflag, h.Mode, h.Uid, h.Gid)
		}
		arch, err := staticELF(b, info.data[b])
		if err != nil {
			t.Errorf("%s: %v", b, err)
		} else if arch != info.config.Architecture {
			t.Errorf("%s: %s binary in a %s image", b, arch, info.config.Architecture)
		}
	}
	if len(info.config.RootFS.DiffIDs) != 2 || len(info.config.History) != 2 {
		t.Errorf("%d layers, %d history entries; want 2 (base, binaries)", len(info.config.RootFS.DiffIDs), len(info.config.History))
	}
	t.Logf("%s: archive %d bytes (%.2f MiB), bound %d", name, info.size, float64(info.size)/(1<<20), maxSize)
	if info.size > maxSize {
		t.Errorf("archive %d bytes, over the bound %d", info.size, maxSize)
	}
}

func TestProductImage(t *testing.T) {
	bins := productBins(t)
	out := filepath.Join(t.TempDir(), "egressnat-image.tar")
	spec, err := Product(ProductOptions{Tag: "v9.8.7", BinDir: bins, Revision: "0123abc", Licenses: "Apache-2.0", Output: out})
	if err != nil {
		t.Fatal(err)
	}
	res, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	if res.Name != "ghcr.io/egressnat/egressnat:v9.8.7" || res.Tag != "v9.8.7" || res.Path != out {
		t.Errorf("result %+v", res)
	}
	info := readBack(t, out)
	if info.desc.Digest.String() != res.Digest {
		t.Errorf("index digest %s, Build said %s", info.desc.Digest, res.Digest)
	}
	if st, _ := os.Stat(out); st.Size() != res.Size {
		t.Errorf("archive %d bytes, Build said %d", st.Size(), res.Size)
	}
	var bs []string
	for _, b := range Binaries {
		bs = append(bs, "/"+b)
	}
	checkCommon(t, info, res.Name, bs, maxProductSize)
	c := info.config.Config
	if !slices.Equal(c.Entrypoint, []string{"/egressnat-operator"}) || len(c.Cmd) != 0 {
		t.Errorf("entrypoint %q cmd %q", c.Entrypoint, c.Cmd)
	}
	if c.User != "65532:65532" {
		t.Errorf("user %q, want the non-root 65532:65532", c.User)
	}
	want := map[string]string{
		"org.opencontainers.image.source":      SourceURL,
		"org.opencontainers.image.description": Description,
		"org.opencontainers.image.version":     "v9.8.7",
		"org.opencontainers.image.revision":    "0123abc",
		"org.opencontainers.image.licenses":    "Apache-2.0",
	}
	for k, v := range want {
		if c.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, c.Labels[k], v)
		}
	}

	// Reproducible: the same binaries copied elsewhere with other times
	// and modes, the files listed in another order, give the same
	// archive byte for byte.
	other := t.TempDir()
	for _, b := range Binaries {
		data, err := os.ReadFile(filepath.Join(bins, b))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(other, b)
		if err := os.WriteFile(p, data, 0o700); err != nil {
			t.Fatal(err)
		}
		old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	spec2, err := Product(ProductOptions{Tag: "v9.8.7", BinDir: other, Revision: "0123abc", Licenses: "Apache-2.0",
		Output: filepath.Join(t.TempDir(), "again.tar")})
	if err != nil {
		t.Fatal(err)
	}
	for i := range spec2.Layers {
		slices.Reverse(spec2.Layers[i].Files)
	}
	res2, err := Build(spec2)
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != res2.Digest {
		t.Errorf("two builds, two digests: %s, %s", res.Digest, res2.Digest)
	}
	if h1, h2 := fileSHA(t, res.Path), fileSHA(t, res2.Path); h1 != h2 {
		t.Errorf("two builds, two archives: sha256 %s, %s", h1, h2)
	}
}

// TestRetag: another name gives the same manifest (digest), another index.
func TestRetag(t *testing.T) {
	dir := t.TempDir()
	spec, err := Pause(filepath.Join(fakeBins(t), "pause"), filepath.Join(dir, "1.tar"))
	if err != nil {
		t.Fatal(err)
	}
	r1, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	spec.Name, spec.Output = "localhost:5000/other/pause:v2", filepath.Join(dir, "2.tar")
	r2, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	if r1.Digest != r2.Digest || r2.Tag != "v2" {
		t.Errorf("retagged: %+v, first %+v", r2, r1)
	}
	info := readBack(t, r2.Path)
	if info.desc.Annotations[AnnotationImageName] != spec.Name || info.desc.Annotations[AnnotationRefName] != "v2" {
		t.Errorf("annotations %v", info.desc.Annotations)
	}
}

// TestDockerfileAgrees: the Dockerfile (for docker users) describes the
// image Product builds: the same user, entrypoint, labels and binaries.
func TestDockerfileAgrees(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := deploy.ParseDockerfile(string(b))
	if err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{}
	var user string
	var entrypoint, copied []string
	label := regexp.MustCompile(`([A-Za-z0-9._-]+)=("(?:[^"\\]|\\.)*"|\S+)`)
	for _, ins := range d.Final().Instructions {
		switch ins.Cmd {
		case "LABEL":
			for _, m := range label.FindAllStringSubmatch(ins.Rest, -1) {
				v := m[2]
				if strings.HasPrefix(v, `"`) {
					if err := json.Unmarshal([]byte(v), &v); err != nil {
						t.Fatalf("LABEL %s: %v", m[1], err)
					}
				}
				labels[m[1]] = v
			}
		case "USER":
			user = strings.TrimSpace(ins.Rest)
		case "ENTRYPOINT":
			entrypoint = ins.Args
		case "COPY":
			dst := ins.Args[len(ins.Args)-1]
			for _, src := range ins.Args[:len(ins.Args)-1] {
				copied = append(copied, filepath.Join(dst, filepath.Base(src)))
			}
		}
	}
	spec, err := Product(ProductOptions{Tag: "v0.0.1", BinDir: fakeBins(t)})
	if err != nil {
		t.Fatal(err)
	}
	if user != spec.Config.User {
		t.Errorf("Dockerfile USER %q, image %q", user, spec.Config.User)
	}
	if !slices.Equal(entrypoint, spec.Config.Entrypoint) {
		t.Errorf("Dockerfile ENTRYPOINT %q, image %q", entrypoint, spec.Config.Entrypoint)
	}
	for k, v := range labels {
		if spec.Config.Labels[k] != v {
			t.Errorf("Dockerfile LABEL %s=%q, image %q", k, v, spec.Config.Labels[k])
		}
	}
	if len(labels) < 2 {
		t.Errorf("Dockerfile labels %v: parsed too few", labels)
	}
	var shipped []string
	for _, f := range spec.Layers[len(spec.Layers)-1].Files {
		shipped = append(shipped, f.Path)
	}
	slices.Sort(copied)
	slices.Sort(shipped)
	if !slices.Equal(copied, shipped) {
		t.Errorf("Dockerfile copies %v, image ships %v", copied, shipped)
	}
}

var (
	fakeOnce sync.Once
	fakeDir  string
	fakeErr  error
)

// fakeBins: the static pause binary, also under the product names, for
// specs that need static files, not the real binaries.
func fakeBins(t *testing.T) string {
	t.Helper()
	fakeOnce.Do(func() {
		fakeDir, fakeErr = os.MkdirTemp("", "egressnat-image-fake-")
		if fakeErr == nil {
			fakeErr = GoBuild(context.Background(), "", fakeDir, "", modulePath+"/test/image/pause")
		}
		for _, name := range Binaries {
			if fakeErr == nil {
				fakeErr = os.Link(filepath.Join(fakeDir, "pause"), filepath.Join(fakeDir, name))
			}
		}
	})
	if fakeErr != nil {
		t.Fatal(fakeErr)
	}
	return fakeDir
}

func fileSHA(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

func TestPauseImage(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "pause.tar")
	res, err := BuildPause(context.Background(), out)
	if err != nil {
		t.Fatal(err)
	}
	info := readBack(t, out)
	checkCommon(t, info, PauseName, []string{"/pause"}, maxPauseSize)
	c := info.config.Config
	if !slices.Equal(c.Entrypoint, []string{"/pause"}) || c.User != "65535:65535" {
		t.Errorf("entrypoint %q user %q", c.Entrypoint, c.User)
	}
	res2, err := BuildPause(context.Background(), filepath.Join(dir, "pause2.tar"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != res2.Digest {
		t.Errorf("two builds: %s, %s", res.Digest, res2.Digest)
	}
}

func TestNetutilImage(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "netutil.tar")
	res, err := BuildNetutil(context.Background(), out)
	if err != nil {
		t.Fatal(err)
	}
	info := readBack(t, out)
	checkCommon(t, info, NetutilName, []string{"/netutil"}, maxNetutilSize)
	c := info.config.Config
	if !slices.Equal(c.Entrypoint, []string{"/netutil"}) || c.Cmd[0] != "echo-server" || c.User != "65532:65532" {
		t.Errorf("entrypoint %q cmd %q user %q", c.Entrypoint, c.Cmd, c.User)
	}
	if _, ok := c.ExposedPorts["8080/udp"]; !ok || len(c.ExposedPorts) != 2 {
		t.Errorf("exposed ports %v", c.ExposedPorts)
	}
	res2, err := BuildNetutil(context.Background(), filepath.Join(dir, "netutil2.tar"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != res2.Digest {
		t.Errorf("two builds: %s, %s", res.Digest, res2.Digest)
	}
}

// TestLayer: entries sorted, parents added, modes and owners as asked,
// nothing of the host.
func TestLayer(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, []byte("from disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	blob, err := layerBlob([]File{
		{Path: "/usr/bin/tool", Source: src, Mode: 0o755 | fs.ModeSetuid},
		{Path: "/a", Data: []byte("x")},
		{Path: "/var/run/", Mode: fs.ModeDir | fs.ModeSticky | 0o777, UID: 7, GID: 8},
	}, time.Unix(1234, 0))
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var got []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got = append(got, fmt.Sprintf("%s %o %d:%d %d %q", h.Name, h.Mode, h.Uid, h.Gid, h.ModTime.Unix(), b))
	}
	want := []string{
		`a 644 0:0 1234 "x"`,
		`usr/ 755 0:0 1234 ""`,
		`usr/bin/ 755 0:0 1234 ""`,
		`usr/bin/tool 4755 0:0 1234 "from disk"`,
		`var/ 755 0:0 1234 ""`,
		`var/run/ 1777 7:8 1234 ""`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	for _, bad := range [][]File{
		{{Path: "rel"}},
		{{Path: "/x"}, {Path: "/x/"}},
		{{Path: "/f"}, {Path: "/f/g"}},
		{{Path: "/d", Mode: fs.ModeDir, Data: []byte("x")}},
		{{Path: "/l", Mode: fs.ModeSymlink}},
		{{Path: "/missing", Source: "/nonexistent/file"}},
	} {
		if _, err := layerBlob(bad, time.Unix(0, 0)); err == nil {
			t.Errorf("%+v: no error", bad)
		}
	}
}

func TestNames(t *testing.T) {
	for name, tag := range map[string]string{
		"ghcr.io/egressnat/egressnat:v0.1.0": "v0.1.0",
		"registry.k8s.io/pause:egressnat":    "egressnat",
		"localhost:5000/a/b:1":               "1",
		"localhost/x:latest":                 "latest",
	} {
		if got, err := tagOf(name); err != nil || got != tag {
			t.Errorf("tagOf(%q) = %q, %v; want %q", name, got, err, tag)
		}
	}
	for _, name := range []string{
		"egressnat:v1",                // no registry host
		"ghcr.io/egressnat/egressnat", // no tag
		"ghcr.io/Egressnat/x:v1",      // upper case repository
		"ghcr.io/x:-v1",               // bad tag
		"ghcr.io/x@sha256:abcd",       // digest
		"localhost:5000/x",            // port, no tag
	} {
		if _, err := tagOf(name); err == nil {
			t.Errorf("tagOf(%q): no error", name)
		}
	}
}

// TestDefaultTag: the default tag is the one kustomization.yaml deploys.
func TestDefaultTag(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "manifests", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	tag := DefaultTag(root)
	if !bytes.Contains(b, []byte("newTag: "+tag+"\n")) {
		t.Errorf("DefaultTag %q is not kustomization.yaml's newTag", tag)
	}
	if DefaultTag(t.TempDir()) != FallbackTag {
		t.Error("no kustomization.yaml: want FallbackTag")
	}
}

func TestLicenses(t *testing.T) {
	dir := t.TempDir()
	if got := Licenses(dir); got != "" {
		t.Errorf("no LICENSE: %q", got)
	}
	os.WriteFile(filepath.Join(dir, "LICENSE"), []byte("                                 Apache License\n                           Version 2.0, January 2004\n"), 0o644)
	if got := Licenses(dir); got != "Apache-2.0" {
		t.Errorf("Apache text: %q", got)
	}
}
