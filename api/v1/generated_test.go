package v1

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestGeneratedFilesFresh regenerates the deepcopy code and the CRD
// manifests into a temporary directory and fails when the committed files
// differ: run `make generate` after changing the types.
func TestGeneratedFilesFresh(t *testing.T) {
	if testing.Short() {
		t.Skip("runs controller-gen")
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	crdDir, objDir := filepath.Join(tmp, "crds"), filepath.Join(tmp, "obj")
	cmd := exec.Command("make", "--no-print-directory", "generate", "GEN_CRD_DIR="+crdDir, "GEN_OBJ_DIR="+objDir)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make generate: %v\n%s", err, out)
	}
	compare := func(generated, committed string) {
		want, err := os.ReadFile(generated)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(committed)
		if err != nil {
			t.Fatalf("committed file missing: %v (run make generate)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run make generate", committed)
		}
	}
	compare(filepath.Join(objDir, "zz_generated.deepcopy.go"), filepath.Join(root, "api", "v1", "zz_generated.deepcopy.go"))
	crds, err := filepath.Glob(filepath.Join(crdDir, "*.yaml"))
	if err != nil || len(crds) != 2 {
		t.Fatalf("controller-gen wrote %v (%v), want two CRDs", crds, err)
	}
	for _, f := range crds {
		compare(f, filepath.Join(root, "manifests", "crds", filepath.Base(f)))
	}
	// manifests/crds also holds its kustomization.yaml (not generated).
	committed, _ := filepath.Glob(filepath.Join(root, "manifests", "crds", "*_*.yaml"))
	if len(committed) != len(crds) {
		t.Errorf("manifests/crds has %d files, controller-gen makes %d: remove the stale ones", len(committed), len(crds))
	}
}
