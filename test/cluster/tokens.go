package cluster

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"
)

// IdentityKinds are the kinds ApplyManifests applies: who the binaries are
// and what they may do, not the workloads.
var IdentityKinds = []string{
	"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
	"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
}

// ManifestsDir returns the manifests directory under root: root itself when
// it holds kustomization.yaml, else root/manifests (root is then the
// repository root).
func ManifestsDir(root string) string {
	if _, err := os.Stat(filepath.Join(root, "kustomization.yaml")); err == nil {
		return root
	}
	return filepath.Join(root, "manifests")
}

// RenderManifests renders the kustomization under root (see ManifestsDir)
// with the server's kubectl and returns its documents.
func RenderManifests(ctx context.Context, srv *apiserver.Server, root string) ([]map[string]any, error) {
	out, errOut, err := srv.Kubectl(ctx, nil, "kustomize", ManifestsDir(root))
	if err != nil {
		return nil, fmt.Errorf("kubectl kustomize %s: %w: %s", ManifestsDir(root), err, errOut)
	}
	return SplitYAML([]byte(out))
}

// SplitYAML parses a multi-document YAML stream; empty documents are
// skipped.
func SplitYAML(b []byte) ([]map[string]any, error) {
	var docs []map[string]any
	for i, part := range bytes.Split(append([]byte("\n"), b...), []byte("\n---")) {
		if len(bytes.TrimSpace(part)) == 0 {
			continue
		}
		var m map[string]any
		if err := yaml.Unmarshal(part, &m); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(m) > 0 {
			docs = append(docs, m)
		}
	}
	return docs, nil
}

// ApplyManifests applies, for real, the namespace, ServiceAccounts, RBAC and
// admission policies of the kustomization under root (see ManifestsDir;
// normally the repository root), not the CRDs or the workloads. It uses
// kubectl as admin, as an installer would.
func ApplyManifests(ctx context.Context, srv *apiserver.Server, root string) error {
	docs, err := RenderManifests(ctx, srv, root)
	if err != nil {
		return err
	}
	var stream bytes.Buffer
	n := 0
	for _, d := range docs {
		kind, _ := d["kind"].(string)
		if !slices.Contains(IdentityKinds, kind) {
			continue
		}
		b, err := yaml.Marshal(d)
		if err != nil {
			return err
		}
		stream.WriteString("---\n")
		stream.Write(b)
		n++
	}
	if n == 0 {
		return fmt.Errorf("no namespace, ServiceAccount or RBAC in %s", ManifestsDir(root))
	}
	if out, errOut, err := srv.Kubectl(ctx, &stream, "apply", "-f", "-"); err != nil {
		return fmt.Errorf("apply identity manifests: %w: %s%s", err, out, errOut)
	}
	return nil
}

// ServiceAccountKubeconfig mints a token (TokenRequest API, valid 24 h) for
// ServiceAccount namespace/sa and writes a kubeconfig at path that reaches
// server with it, so that a binary runs with exactly the ServiceAccount's
// permissions.
func ServiceAccountKubeconfig(ctx context.Context, client kubernetes.Interface, server, namespace, sa, path string) error {
	token, err := MintToken(ctx, client, namespace, sa, 24*time.Hour, nil)
	if err != nil {
		return err
	}
	return apiserver.WriteKubeconfig(path, server, token)
}

// MintToken asks the TokenRequest API for a token of ServiceAccount
// namespace/sa, valid for ttl, bound to boundTo when it is not nil (a Pod
// binding makes the API server add the pod's node name to the token).
func MintToken(ctx context.Context, client kubernetes.Interface, namespace, sa string, ttl time.Duration, boundTo *authenticationv1.BoundObjectReference) (string, error) {
	secs := int64(ttl / time.Second)
	tr, err := client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &secs, BoundObjectRef: boundTo},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("mint token for %s/%s: %w", namespace, sa, err)
	}
	if strings.TrimSpace(tr.Status.Token) == "" {
		return "", fmt.Errorf("mint token for %s/%s: empty token", namespace, sa)
	}
	return tr.Status.Token, nil
}
