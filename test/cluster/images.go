package cluster

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/image"
)

// Images are the OCI archives a real cluster imports into every node's
// containerd.
type Images struct {
	// Egressnat is the product image, tagged as manifests/ runs it.
	Egressnat image.Result
	// Pause is the sandbox image (PauseImage).
	Pause image.Result
	// Netutil is the client and echo image of the tests' pods
	// (image.NetutilName).
	Netutil image.Result
}

// All returns the archives' paths.
func (i Images) All() []string { return []string{i.Egressnat.Path, i.Pause.Path, i.Netutil.Path} }

// BuildImages builds the product, pause and netutil images offline into
// dir (test/image: from the module's source, no registry).
func BuildImages(ctx context.Context, dir string) (Images, error) {
	var im Images
	var err error
	if im.Egressnat, err = image.BuildProduct(ctx, image.ProductOptions{Output: filepath.Join(dir, "egressnat.tar")}, ""); err != nil {
		return im, fmt.Errorf("egressnat image: %w", err)
	}
	if im.Pause, err = image.BuildPause(ctx, filepath.Join(dir, "pause.tar")); err != nil {
		return im, fmt.Errorf("pause image: %w", err)
	}
	if im.Pause.Name != PauseImage {
		return im, fmt.Errorf("pause image is %s, containerd's sandbox_image %s", im.Pause.Name, PauseImage)
	}
	if im.Netutil, err = image.BuildNetutil(ctx, filepath.Join(dir, "netutil.tar")); err != nil {
		return im, fmt.Errorf("netutil image: %w", err)
	}
	return im, nil
}

// RepoRoot is the repository root (see apiserver.RepoRoot).
func RepoRoot() (string, error) { return apiserver.RepoRoot() }
