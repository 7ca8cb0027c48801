// Command mkimage builds egressnat's container images offline (no
// registry, no docker daemon) into OCI archives, for
// `ctr -n k8s.io images import ARCHIVE` or `docker load -i ARCHIVE`.
//
//	mkimage [-image egressnat|pause|netutil|all] [-tag TAG] [-o ARCHIVE]
//	        [-bin DIR] [-ldflags FLAGS] [-version V] [-revision R] [-created T]
//
// -image egressnat (the default) is ghcr.io/egressnat/egressnat:TAG (TAG
// defaults to manifests/kustomization.yaml's newTag) from the static
// binaries in -bin DIR, or, without -bin, from ./cmd/... built here
// (CGO_ENABLED=0 -trimpath -ldflags "-s -w FLAGS"); default archive
// bin/egressnat-image.tar. pause (registry.k8s.io/pause:egressnat,
// bin/pause-image.tar) and netutil (egressnat.test/netutil:v1,
// bin/netutil-image.tar) are built from test/image/pause and
// test/image/netutil. all builds the three to their default archives.
//
// For each image it prints one line:
//
//	image name=NAME archive=PATH digest=sha256:... size=BYTES
//
// Run it from the module (make image does).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/test/image"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	which := flag.String("image", "egressnat", "egressnat, pause, netutil or all")
	tag := flag.String("tag", "", "product image tag (default: manifests/kustomization.yaml's newTag)")
	out := flag.String("o", "", "archive to write (default: bin/<image>-image.tar under the module)")
	binDir := flag.String("bin", "", "directory holding the prebuilt static product binaries (default: build them)")
	ldflags := flag.String("ldflags", "", "extra -ldflags when building the product binaries here")
	version := flag.String("version", "", "org.opencontainers.image.version label (default: the tag)")
	revision := flag.String("revision", "", "org.opencontainers.image.revision label (default: git HEAD)")
	created := flag.String("created", "", "image time, RFC 3339 or Unix seconds (default: $SOURCE_DATE_EPOCH, else 1970-01-01)")
	flag.Parse()
	if flag.NArg() != 0 {
		flag.Usage()
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	root, err := image.ModuleRoot()
	if err != nil {
		return err
	}
	t, err := parseCreated(*created)
	if err != nil {
		return err
	}
	images := []string{*which}
	if *which == "all" {
		if *out != "" {
			return fmt.Errorf("-o with -image all: each image goes to its default archive")
		}
		images = []string{"egressnat", "pause", "netutil"}
	}
	for _, name := range images {
		path := *out
		if path == "" {
			path = filepath.Join(root, "bin", name+"-image.tar")
		}
		var res image.Result
		switch name {
		case "egressnat":
			o := image.ProductOptions{
				Tag:      *tag,
				Version:  *version,
				Revision: *revision,
				Licenses: image.Licenses(root),
				Created:  t,
				Output:   path,
			}
			if o.Tag == "" {
				o.Tag = image.DefaultTag(root)
			}
			if o.Revision == "" {
				o.Revision = image.Revision(ctx, root)
			}
			if *binDir == "" {
				res, err = image.BuildProduct(ctx, o, *ldflags)
				break
			}
			o.BinDir = *binDir
			var spec image.Spec
			if spec, err = image.Product(o); err == nil {
				res, err = image.Build(spec)
			}
		case "pause":
			res, err = image.BuildPause(ctx, path)
		case "netutil":
			res, err = image.BuildNetutil(ctx, path)
		default:
			return fmt.Errorf("-image %q: want egressnat, pause, netutil or all", name)
		}
		if err != nil {
			return err
		}
		if rel, err := filepath.Rel(root, res.Path); err == nil && filepath.IsLocal(rel) {
			res.Path = rel
		}
		fmt.Printf("image name=%s archive=%s digest=%s size=%d\n", res.Name, res.Path, res.Digest, res.Size)
	}
	return nil
}

// parseCreated reads -created, else $SOURCE_DATE_EPOCH; zero means the
// Unix epoch (image.Build's default).
func parseCreated(s string) (time.Time, error) {
	if s == "" {
		s = os.Getenv("SOURCE_DATE_EPOCH")
	}
	if s == "" {
		return time.Time{}, nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return time.Unix(n, 0), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("created %q: want RFC 3339 or Unix seconds", s)
	}
	return t, nil
}
