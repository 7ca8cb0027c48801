package image

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// The egressnat images.
const (
	// Repository is the product image's repository; the manifests run
	// Repository:<newTag of manifests/kustomization.yaml>.
	Repository = "ghcr.io/egressnat/egressnat"
	// FallbackTag is the product tag when kustomization.yaml gives none.
	FallbackTag = "v0.1.0"
	// PauseName is the sandbox image: point containerd's sandbox_image
	// (CRI plugin) or kubelet's --pod-infra-container-image at it.
	PauseName = "registry.k8s.io/pause:egressnat"
	// NetutilName is the test client and echo server image.
	NetutilName = "egressnat.test/netutil:v1"

	// SourceURL and Description are the product image's
	// org.opencontainers.image.source and .description labels, as in
	// the Dockerfile.
	SourceURL   = "https://github.com/egressnat/egressnat"
	Description = "egressnat: egress NAT gateway for Kubernetes (agent, operator, egressnatctl)"

	// NonrootUID is the nonroot user and group of /etc/passwd and
	// /etc/group (distroless's nonroot), the product image's user.
	NonrootUID = 65532
	// PauseUID is the pause image's user, as registry.k8s.io/pause's.
	PauseUID = 65535

	modulePath = "github.com/egressnat/egressnat"
)

// Binaries are the product image's programs, each at /<name>, built
// from ./cmd/<name>.
var Binaries = []string{"egressnat-agent", "egressnat-operator", "egressnatctl"}

// Env is the image's PATH, distroless's.
var Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

// BaseLayer is what a scratch image of static Go binaries needs: users
// and groups (root, nobody, nonroot 65532, as distroless static) for
// USER and runAsUser, a sticky world-writable /tmp and nonroot's home.
// No shell, no libc, no CA certificates (the components trust only the
// API server's CA from their ServiceAccount).
func BaseLayer() Layer {
	passwd := "root:x:0:0:root:/root:/sbin/nologin\n" +
		"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n" +
		"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
	group := "root:x:0:\n" +
		"nobody:x:65534:\n" +
		"nonroot:x:65532:\n"
	return Layer{
		Comment: "egressnat test/image: /etc/passwd, /etc/group, /tmp, /home/nonroot",
		Files: []File{
			{Path: "/etc/passwd", Data: []byte(passwd), Mode: 0o644},
			{Path: "/etc/group", Data: []byte(group), Mode: 0o644},
			{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
			{Path: "/home/nonroot", Mode: fs.ModeDir | 0o700, UID: NonrootUID, GID: NonrootUID},
		},
	}
}

// ProductOptions are the product image's variables.
type ProductOptions struct {
	// Tag defaults to DefaultTag(ModuleRoot()).
	Tag string
	// BinDir holds the three static binaries (Binaries).
	BinDir string
	// Version is the org.opencontainers.image.version label; Tag when
	// empty. Revision (.revision, a commit) and Licenses (.licenses, an
	// SPDX expression) are left out when empty.
	Version, Revision, Licenses string
	// Created is the image's time (the Unix epoch when zero).
	Created time.Time
	Output  string
}

// Product returns the spec of the product image: the Dockerfile's final
// stage (distroless static:nonroot plus the three binaries), from scratch.
// It checks that the binaries are static ELF files and takes the image's
// architecture from them.
func Product(o ProductOptions) (Spec, error) {
	if o.Tag == "" {
		o.Tag = FallbackTag
		if root, err := ModuleRoot(); err == nil {
			o.Tag = DefaultTag(root)
		}
	}
	if o.Version == "" {
		o.Version = o.Tag
	}
	labels := map[string]string{
		"org.opencontainers.image.source":      SourceURL,
		"org.opencontainers.image.description": Description,
		"org.opencontainers.image.version":     o.Version,
	}
	if o.Revision != "" {
		labels["org.opencontainers.image.revision"] = o.Revision
	}
	if o.Licenses != "" {
		labels["org.opencontainers.image.licenses"] = o.Licenses
	}
	app := Layer{Comment: "egressnat test/image: " + strings.Join(Binaries, " ")}
	arch := ""
	for _, b := range Binaries {
		p := filepath.Join(o.BinDir, b)
		a, err := StaticELF(p)
		if err != nil {
			return Spec{}, err
		}
		if arch != "" && a != arch {
			return Spec{}, fmt.Errorf("%s: %s binary among %s ones", p, a, arch)
		}
		arch = a
		app.Files = append(app.Files, File{Path: "/" + b, Source: p, Mode: 0o755})
	}
	return Spec{
		Name:   Repository + ":" + o.Tag,
		Layers: []Layer{BaseLayer(), app},
		Config: Config{
			Entrypoint: []string{"/egressnat-operator"},
			User:       fmt.Sprintf("%d:%d", NonrootUID, NonrootUID),
			Env:        Env,
			WorkingDir: "/",
			Labels:     labels,
		},
		Arch:    arch,
		Created: o.Created,
		Output:  o.Output,
	}, nil
}

// Pause returns the spec of the pause image from the pause binary
// (test/image/pause, static).
func Pause(bin, output string) (Spec, error) {
	arch, err := StaticELF(bin)
	if err != nil {
		return Spec{}, err
	}
	return Spec{
		Name: PauseName,
		Layers: []Layer{BaseLayer(), {
			Comment: "egressnat test/image: /pause",
			Files:   []File{{Path: "/pause", Source: bin, Mode: 0o755}},
		}},
		Config: Config{
			Entrypoint: []string{"/pause"},
			User:       fmt.Sprintf("%d:%d", PauseUID, PauseUID),
			Env:        Env,
			WorkingDir: "/",
			Labels: map[string]string{
				"org.opencontainers.image.source":      SourceURL,
				"org.opencontainers.image.description": "egressnat test pause (sandbox) image",
			},
		},
		Arch:   arch,
		Output: output,
	}, nil
}

// Netutil returns the spec of the netutil image from the netutil binary
// (test/image/netutil, static): it runs the echo server on TCP and UDP
// 8080 by default, as nonroot.
func Netutil(bin, output string) (Spec, error) {
	arch, err := StaticELF(bin)
	if err != nil {
		return Spec{}, err
	}
	return Spec{
		Name: NetutilName,
		Layers: []Layer{BaseLayer(), {
			Comment: "egressnat test/image: /netutil",
			Files:   []File{{Path: "/netutil", Source: bin, Mode: 0o755}},
		}},
		Config: Config{
			Entrypoint:   []string{"/netutil"},
			Cmd:          []string{"echo-server", "--tcp", ":8080", "--udp", ":8080"},
			User:         fmt.Sprintf("%d:%d", NonrootUID, NonrootUID),
			Env:          Env,
			WorkingDir:   "/",
			ExposedPorts: []string{"8080/tcp", "8080/udp"},
			Labels: map[string]string{
				"org.opencontainers.image.source":      SourceURL,
				"org.opencontainers.image.description": "egressnat test client and echo server (netutil)",
			},
		},
		Arch:   arch,
		Output: output,
	}, nil
}

// GoBuild builds the main packages pkgs (import paths or patterns, e.g.
// "github.com/egressnat/egressnat/cmd/...") into outDir as static Linux
// binaries: CGO_ENABLED=0, GOOS=linux, -trimpath, -ldflags "-s -w
// <ldflags>". GOARCH and the rest of the environment are the caller's.
// dir is the go command's directory (any directory of the module; "" is
// the current one).
func GoBuild(ctx context.Context, dir, outDir, ldflags string, pkgs ...string) error {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	abs, err := filepath.Abs(outDir)
	if err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	args := []string{"build", "-trimpath", "-ldflags", strings.TrimSpace("-s -w " + ldflags), "-o", abs + string(filepath.Separator)}
	cmd := exec.CommandContext(ctx, goCommand(), append(args, pkgs...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", strings.Join(pkgs, " "), err, out)
	}
	return nil
}

// goCommand is $GO or go.
func goCommand() string {
	if g := os.Getenv("GO"); g != "" {
		return g
	}
	return "go"
}

// BuildProduct builds the three binaries from the module's ./cmd/... into
// a temporary directory, then the product image to o.Output (o.BinDir is
// ignored).
func BuildProduct(ctx context.Context, o ProductOptions, ldflags string) (Result, error) {
	dir, err := os.MkdirTemp("", "egressnat-bin-")
	if err != nil {
		return Result{}, fmt.Errorf("build product: %w", err)
	}
	defer os.RemoveAll(dir)
	if err := GoBuild(ctx, "", dir, ldflags, modulePath+"/cmd/..."); err != nil {
		return Result{}, err
	}
	o.BinDir = dir
	spec, err := Product(o)
	if err != nil {
		return Result{}, err
	}
	return Build(spec)
}

// BuildPause builds test/image/pause and the pause image to output.
func BuildPause(ctx context.Context, output string) (Result, error) {
	return buildTool(ctx, "pause", output, Pause)
}

// BuildNetutil builds test/image/netutil and the netutil image to output.
func BuildNetutil(ctx context.Context, output string) (Result, error) {
	return buildTool(ctx, "netutil", output, Netutil)
}

func buildTool(ctx context.Context, name, output string, spec func(bin, output string) (Spec, error)) (Result, error) {
	dir, err := os.MkdirTemp("", "egressnat-"+name+"-")
	if err != nil {
		return Result{}, fmt.Errorf("build %s: %w", name, err)
	}
	defer os.RemoveAll(dir)
	if err := GoBuild(ctx, "", dir, "", modulePath+"/test/image/"+name); err != nil {
		return Result{}, err
	}
	s, err := spec(filepath.Join(dir, name), output)
	if err != nil {
		return Result{}, err
	}
	return Build(s)
}

// goarch maps ELF machines to GOARCH.
var goarch = map[elf.Machine]string{
	elf.EM_X86_64:    "amd64",
	elf.EM_AARCH64:   "arm64",
	elf.EM_386:       "386",
	elf.EM_ARM:       "arm",
	elf.EM_S390:      "s390x",
	elf.EM_RISCV:     "riscv64",
	elf.EM_LOONGARCH: "loong64",
}

// StaticELF checks that the file at p is a statically linked ELF
// executable (no PT_INTERP program header, no needed libraries) and
// returns its GOARCH.
func StaticELF(p string) (string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", fmt.Errorf("static check: %w", err)
	}
	return staticELF(p, b)
}

func staticELF(name string, b []byte) (string, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	defer f.Close()
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return "", fmt.Errorf("%s: ELF type %v, not an executable", name, f.Type)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return "", fmt.Errorf("%s: dynamically linked (PT_INTERP), build with CGO_ENABLED=0", name)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		return "", fmt.Errorf("%s: needs shared libraries %v", name, libs)
	}
	arch := goarch[f.Machine]
	switch f.Machine {
	case elf.EM_PPC64:
		arch = "ppc64"
		if f.ByteOrder.String() == "LittleEndian" {
			arch = "ppc64le"
		}
	}
	if arch == "" {
		return "", fmt.Errorf("%s: unknown ELF machine %v", name, f.Machine)
	}
	return arch, nil
}

// ModuleRoot is the directory of the egressnat go.mod, found from the
// current directory up.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("module root: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(bytes.TrimSpace(b), []byte("module "+modulePath+"\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("module root: not inside " + modulePath)
		}
		dir = parent
	}
}

// DefaultTag is the product image's tag in root/manifests/kustomization.yaml
// (images: name Repository, newTag), the one `kubectl apply -k manifests/`
// runs, or FallbackTag.
func DefaultTag(root string) string {
	b, err := os.ReadFile(filepath.Join(root, "manifests", "kustomization.yaml"))
	if err != nil {
		return FallbackTag
	}
	var k struct {
		Images []struct {
			Name   string `json:"name"`
			NewTag string `json:"newTag"`
		} `json:"images"`
	}
	if yaml.Unmarshal(b, &k) != nil {
		return FallbackTag
	}
	for _, im := range k.Images {
		if im.Name == Repository && im.NewTag != "" {
			return im.NewTag
		}
	}
	return FallbackTag
}

// Licenses returns the SPDX identifier of root/LICENSE (or LICENSE.txt,
// LICENSE.md, COPYING) for the well-known texts, or "" (no file, or a text
// it does not recognise).
func Licenses(root string) string {
	for _, name := range []string{"LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"} {
		b, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			continue
		}
		t := string(b)
		switch {
		case strings.Contains(t, "Apache License") && strings.Contains(t, "Version 2.0"):
			return "Apache-2.0"
		case strings.Contains(t, "MIT License") || strings.Contains(t, "Permission is hereby granted, free of charge"):
			return "MIT"
		case strings.Contains(t, "Mozilla Public License") && strings.Contains(t, "2.0"):
			return "MPL-2.0"
		case strings.Contains(t, "Redistribution and use in source and binary forms") && strings.Contains(t, "Neither the name"):
			return "BSD-3-Clause"
		case strings.Contains(t, "Redistribution and use in source and binary forms"):
			return "BSD-2-Clause"
		}
		return ""
	}
	return ""
}

// Revision is root's git HEAD commit, or "" (no git, not a repository).
func Revision(ctx context.Context, root string) string {
	cmd := exec.CommandContext(ctx, "git", "rev-parse", "HEAD")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
