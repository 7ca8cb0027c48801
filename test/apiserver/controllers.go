package apiserver

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
)

// ControllerManager returns the path of the kube-controller-manager of
// KubeVersion, building it first (minutes on a cold cache) when it is not
// cached. It is the binary ClusterBinaries builds, alone.
func ControllerManager() (string, error) {
	p := filepath.Join(current.binDir(), "kube-controller-manager")
	if err := buildCached(current, []buildTarget{{p, "k8s.io/kubernetes/cmd/kube-controller-manager", current.versionLDFlags()}}); err != nil {
		return "", err
	}
	return p, nil
}

// StartControllers runs kube-controller-manager against the server with
// only the named controllers (e.g. "clusterrole-aggregation", which fills
// the built-in view, edit and admin ClusterRoles from the ClusterRoles
// labelled to aggregate into them), as admin, without leader election and
// without serving; Stop ends it. Its log is Dir/kube-controller-manager.log.
func (s *Server) StartControllers(ctx context.Context, controllers ...string) error {
	bin, err := ControllerManager()
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(s.Dir, "controller-manager.kubeconfig")
	if err := WriteKubeconfig(kubeconfig, s.InNetworkURL, s.AdminToken); err != nil {
		return err
	}
	if err := s.spawn(s.opts, "kube-controller-manager", bin,
		"--kubeconfig="+kubeconfig,
		"--controllers="+strings.Join(controllers, ","),
		"--leader-elect=false",
		"--secure-port=0",
		"--v=1",
	); err != nil {
		return fmt.Errorf("start kube-controller-manager: %w", err)
	}
	return nil
}
