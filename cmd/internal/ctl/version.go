package ctl

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/egressnat/egressnat/cmd/internal/version"
	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	apiversion "k8s.io/apimachinery/pkg/version"
)

// VersionReport is what version prints: this binary's version, the API
// server's, and the images the egressnat pods run.
type VersionReport struct {
	Client version.Info     `json:"clientVersion"`
	Server *apiversion.Info `json:"serverVersion,omitempty"`
	// Namespace is where the egressnat pods were looked for ("" when
	// they were not).
	Namespace  string             `json:"namespace,omitempty"`
	Components []ComponentVersion `json:"components,omitempty"`
}

// ComponentVersion is the pods of one component that run one image.
type ComponentVersion struct {
	// Component is the pods' app.kubernetes.io/name: egressnat-agent or
	// egressnat-operator.
	Component string `json:"component"`
	// Version is the image's tag ("" when it has none).
	Version string `json:"version"`
	Image   string `json:"image"`
	Pods    int    `json:"pods"`
}

// The egressnat workloads, by their pods' app.kubernetes.io/name label
// (manifests/).
const (
	componentLabel    = "app.kubernetes.io/name"
	componentSelector = componentLabel + " in (egressnat-agent,egressnat-operator)"
	// DefaultNamespace is where manifests/ installs egressnat.
	DefaultNamespace = "egressnat-system"
)

// ComponentVersions groups the pods by component and the image of their
// first container, sorted by component and image. Pods that terminated
// are left out.
func ComponentVersions(pods []corev1.Pod) []ComponentVersion {
	var out []ComponentVersion
	for _, p := range pods {
		name := p.Labels[componentLabel]
		if name == "" || len(p.Spec.Containers) == 0 || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		image := p.Spec.Containers[0].Image
		i := slices.IndexFunc(out, func(c ComponentVersion) bool { return c.Component == name && c.Image == image })
		if i < 0 {
			out = append(out, ComponentVersion{Component: name, Version: imageTag(image), Image: image})
			i = len(out) - 1
		}
		out[i].Pods++
	}
	slices.SortFunc(out, func(a, b ComponentVersion) int {
		if c := strings.Compare(a.Component, b.Component); c != 0 {
			return c
		}
		return strings.Compare(a.Image, b.Image)
	})
	return out
}

// imageTag is the tag of an image reference: "v0.1.0" for
// ghcr.io/egressnat/egressnat:v0.1.0 (with or without a digest), "" for a
// reference without a tag.
func imageTag(image string) string {
	image, _, _ = strings.Cut(image, "@")
	i := strings.LastIndexByte(image, ':')
	if i < 0 || strings.ContainsRune(image[i+1:], '/') {
		return ""
	}
	return image[i+1:]
}

// ServerVersion asks the API server its version.
func (l *Loader) ServerVersion(ctx context.Context) (*apiversion.Info, error) {
	v, err := l.Core.Discovery().ServerVersionWithContext(ctx)
	if err != nil {
		return nil, l.apiError(err)
	}
	return v, nil
}

// LoadComponents lists the egressnat pods of namespace.
func (l *Loader) LoadComponents(ctx context.Context, namespace string) ([]ComponentVersion, error) {
	pl, err := l.Core.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: componentSelector})
	if err != nil {
		return nil, l.apiError(err)
	}
	return ComponentVersions(pl.Items), nil
}

// WriteVersion writes the report as text, JSON or YAML.
func WriteVersion(w io.Writer, r VersionReport, format string) error {
	if ok, err := writeData(w, r, format); ok {
		return err
	}
	switch format {
	case "text", "":
		var b strings.Builder
		fmt.Fprintf(&b, "Client Version: %s\n", r.Client)
		if r.Server != nil {
			fmt.Fprintf(&b, "Server Version: %s\n", r.Server.GitVersion)
		}
		for _, c := range r.Components {
			fmt.Fprintf(&b, "%s: %s (%s, %d %s)\n", c.Component, dash(c.Version), c.Image, c.Pods, plural(c.Pods, "pod"))
		}
		if r.Namespace != "" && len(r.Components) == 0 {
			fmt.Fprintf(&b, "egressnat: no agent or operator pods in namespace %s\n", r.Namespace)
		}
		_, err := io.WriteString(w, b.String())
		return err
	}
	return fmt.Errorf("unknown output format %q: want text, json or yaml", format)
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

func (a *app) versionCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "version",
		Short: "The versions of this client, of the API server and of the egressnat agents and operators running",
		Long: `The version of this client; unless --client, the API server's version and
the images the egressnat agent and operator pods run, in the namespace of -n
(default ` + DefaultNamespace + `). Without the right to list those pods,
a warning replaces them.`,
		Args: noArgs,
	}
	clientOnly := c.Flags().Bool("client", false, "only the client's version: do not contact the API server")
	out := outputFlag(c, "text", FormatJSON, FormatYAML)
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		if err := checkOutput(*out, "text", FormatJSON, FormatYAML); err != nil {
			return err
		}
		r := VersionReport{Client: version.Get()}
		if *clientOnly {
			return WriteVersion(a.stdout, r, *out)
		}
		err := a.serverVersions(cmd.Context(), &r)
		if werr := WriteVersion(a.stdout, r, *out); werr != nil {
			return werr
		}
		return err
	})
	return c
}

// serverVersions fills the server's part of the report. The server's
// version is required; the pods are not (a warning).
func (a *app) serverVersions(ctx context.Context, r *VersionReport) error {
	l, err := a.loader()
	if err != nil {
		return err
	}
	if r.Server, err = l.ServerVersion(ctx); err != nil {
		return err
	}
	ns := *a.kube.Namespace
	if ns == "" {
		ns = DefaultNamespace
	}
	comps, err := l.LoadComponents(ctx, ns)
	if err != nil {
		fmt.Fprintf(a.stderr, "%s: warning: egressnat pods in %s: %v\n", a.prog, ns, err)
		return nil
	}
	r.Namespace, r.Components = ns, comps
	return nil
}
