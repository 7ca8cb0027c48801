package ctl

// The command line: kubectl's connection flags, exit codes, help,
// completion and version, against a fake API server (net/http/httptest)
// that records what reaches it.

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/version"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	apiversion "k8s.io/apimachinery/pkg/version"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"
)

// fakeAPI answers /version, lists of namespaces and of pods, and 404 to
// everything else (no CRDs, no pod by name); it records every request.
type fakeAPI struct {
	*httptest.Server
	pods []corev1.Pod
	mu   sync.Mutex
	reqs []*http.Request
}

func newFakeAPI(t *testing.T, tls bool, pods ...corev1.Pod) *fakeAPI {
	f := &fakeAPI{pods: pods}
	f.Server = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshakes failed on purpose
	if tls {
		f.StartTLS()
	} else {
		f.Start()
	}
	t.Cleanup(f.Close)
	return f
}

func (f *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.reqs = append(f.reqs, r.Clone(context.Background()))
	f.mu.Unlock()
	reply := func(code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v) //nolint:errcheck
	}
	switch {
	case r.URL.Path == "/version":
		reply(200, apiversion.Info{Major: "1", Minor: "37", GitVersion: "v1.37.2", Platform: "linux/amd64"})
	case r.URL.Path == "/api/v1/namespaces":
		reply(200, corev1.NamespaceList{TypeMeta: metav1.TypeMeta{Kind: "NamespaceList", APIVersion: "v1"}})
	case strings.HasPrefix(r.URL.Path, "/api/v1/namespaces/") && strings.HasSuffix(r.URL.Path, "/pods"):
		reply(200, corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, Items: f.pods})
	default:
		reply(404, metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure,
			Reason: metav1.StatusReasonNotFound, Code: 404, Message: "not found"})
	}
}

// requests returns the recorded requests and forgets them.
func (f *fakeAPI) requests() []*http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.reqs
	f.reqs = nil
	return r
}

// writeKubeconfig writes a kubeconfig with contexts a (current, no
// namespace) and b (namespace team-b, user bob with a token), each on its
// own server, and tls (no CA: its certificate does not verify).
func writeKubeconfig(t *testing.T, a, b, tlsServer string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["a"] = &clientcmdapi.Cluster{Server: a}
	cfg.Clusters["b"] = &clientcmdapi.Cluster{Server: b}
	cfg.Clusters["tls"] = &clientcmdapi.Cluster{Server: tlsServer}
	cfg.AuthInfos["alice"] = &clientcmdapi.AuthInfo{}
	cfg.AuthInfos["bob"] = &clientcmdapi.AuthInfo{Token: "bob-token"}
	cfg.Contexts["a"] = &clientcmdapi.Context{Cluster: "a", AuthInfo: "alice"}
	cfg.Contexts["b"] = &clientcmdapi.Context{Cluster: "b", AuthInfo: "bob", Namespace: "team-b"}
	cfg.Contexts["tls"] = &clientcmdapi.Context{Cluster: "tls", AuthInfo: "alice"}
	cfg.CurrentContext = "a"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

func runMain(t *testing.T, prog string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	code = Main(ctx, prog, args, &out, &errOut)
	return out.String(), errOut.String(), code
}

// TestKubeFlagsReachRESTConfig: kubectl's flags are what the clients are
// built from; the request timeout is 20 s unless --request-timeout says
// otherwise.
func TestKubeFlagsReachRESTConfig(t *testing.T) {
	kc := writeKubeconfig(t, "https://a.example:6443", "https://b.example:6443", "https://tls.example:6443")
	t.Setenv("KUBECONFIG", kc)
	type conn struct {
		host, as string
		groups   []string
		token    string
		insecure bool
		timeout  time.Duration
	}
	a := conn{host: "https://a.example:6443", timeout: 20 * time.Second}
	with := func(c conn, f func(*conn)) conn { f(&c); return c }
	for _, tc := range []struct {
		args []string
		want conn
	}{
		{nil, a},
		{[]string{"--context", "b"}, with(a, func(c *conn) { c.host, c.token = "https://b.example:6443", "bob-token" })},
		{[]string{"--cluster", "b"}, with(a, func(c *conn) { c.host = "https://b.example:6443" })},
		{[]string{"--user", "bob"}, with(a, func(c *conn) { c.token = "bob-token" })},
		{[]string{"--as", "carol", "--as-group", "g1", "--as-group", "g2"},
			with(a, func(c *conn) { c.as, c.groups = "carol", []string{"g1", "g2"} })},
		{[]string{"--request-timeout", "7s"}, with(a, func(c *conn) { c.timeout = 7 * time.Second })},
		{[]string{"--request-timeout=0"}, with(a, func(c *conn) { c.timeout = 0 })},
		{[]string{"-s", "https://c.example", "--token", "t0k", "--insecure-skip-tls-verify"},
			with(a, func(c *conn) { c.host, c.token, c.insecure = "https://c.example", "t0k", true })},
		{[]string{"--kubeconfig", kc, "--context=tls"}, with(a, func(c *conn) { c.host = "https://tls.example:6443" })},
	} {
		app := newApp("egressnatctl", &bytes.Buffer{}, &bytes.Buffer{})
		if err := app.command().ParseFlags(tc.args); err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		cfg, err := app.restConfig()
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		got := conn{cfg.Host, cfg.Impersonate.UserName, cfg.Impersonate.Groups, cfg.BearerToken, cfg.Insecure, cfg.Timeout}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%v: %+v, want %+v", tc.args, got, tc.want)
		}
	}

	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "absent"))
	if _, err := newApp("egressnatctl", nil, nil).restConfig(); err != errNoKubeconfig {
		t.Errorf("no kubeconfig: %v, want %v", err, errNoKubeconfig)
	}
}

// TestKubeFlagsOnTheWire: the flags reach the requests: the server of the
// context, the impersonation and token headers, the namespace of -n or of
// the context, TLS verification, and the request timeout.
func TestKubeFlagsOnTheWire(t *testing.T) {
	a, b, tlsAPI := newFakeAPI(t, false), newFakeAPI(t, false), newFakeAPI(t, true)
	kc := writeKubeconfig(t, a.URL, b.URL, tlsAPI.URL)
	t.Setenv("KUBECONFIG", kc)
	notInstalled := "egressnatctl: the networking.gke.io CRDs are not installed: kubectl apply -k manifests/\n"

	// The current context a; --context b.
	if _, errOut, code := runMain(t, "egressnatctl", "status"); code != 1 || errOut != notInstalled || len(a.requests()) == 0 {
		t.Errorf("status on a: exit %d, %q", code, errOut)
	}
	_, errOut, code := runMain(t, "egressnatctl", "--context", "b", "status", "--as", "carol", "--as-group", "g1")
	reqs := b.requests()
	if code != 1 || errOut != notInstalled || len(reqs) == 0 {
		t.Fatalf("status on b: exit %d, %q, %d requests", code, errOut, len(reqs))
	}
	if h := reqs[0].Header; h.Get("Impersonate-User") != "carol" || h.Get("Impersonate-Group") != "g1" {
		t.Errorf("status on b: headers %v", h)
	}
	if n := len(a.requests()); n != 0 {
		t.Errorf("--context b: %d requests to a", n)
	}

	// The pod's namespace: NAMESPACE/NAME, -n, the context's.
	for _, tc := range []struct {
		args []string
		api  *fakeAPI
		path string
	}{
		{[]string{"explain", "pod", "shop/web"}, a, "/api/v1/namespaces/shop/pods/web"},
		{[]string{"explain", "pod", "web", "-n", "shop"}, a, "/api/v1/namespaces/shop/pods/web"},
		{[]string{"-n", "shop", "explain", "pod", "shop/web"}, a, "/api/v1/namespaces/shop/pods/web"},
		{[]string{"explain", "pod", "web", "--context", "b"}, b, "/api/v1/namespaces/team-b/pods/web"},
		{[]string{"explain", "pod", "web", "--context", "b", "--namespace=shop"}, b, "/api/v1/namespaces/shop/pods/web"},
		{[]string{"explain", "pod", "web", "--server", b.URL, "-n", "x"}, b, "/api/v1/namespaces/x/pods/web"},
	} {
		_, errOut, code := runMain(t, "egressnatctl", tc.args...)
		reqs := tc.api.requests()
		ns, name, _ := strings.Cut(strings.TrimPrefix(tc.path, "/api/v1/namespaces/"), "/pods/")
		if code != 1 || errOut != "egressnatctl: pod "+ns+"/"+name+" not found\n" || len(reqs) != 1 || reqs[0].URL.Path != tc.path {
			var paths []string
			for _, r := range reqs {
				paths = append(paths, r.URL.Path)
			}
			t.Errorf("%v: exit %d, %q, requests %v; want %s", tc.args, code, errOut, paths, tc.path)
		}
	}

	// TLS: the certificate of tls does not verify unless told not to.
	if _, errOut, code := runMain(t, "egressnatctl", "status", "--context", "tls"); code != 1 || !strings.Contains(errOut, "certificate") {
		t.Errorf("tls: exit %d, %q", code, errOut)
	}
	tlsAPI.requests()
	if _, errOut, code := runMain(t, "egressnatctl", "status", "--context", "tls", "--insecure-skip-tls-verify"); code != 1 ||
		errOut != notInstalled || len(tlsAPI.requests()) == 0 {
		t.Errorf("tls, --insecure-skip-tls-verify: exit %d, %q", code, errOut)
	}
	// Credentials go only over TLS (clientcmd): the user's token, or --token.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--user", "bob"}, "Bearer bob-token"},
		{[]string{"--user", "bob", "--token", "t0k"}, "Bearer t0k"},
		{[]string{"--token", "t0k"}, "Bearer t0k"},
	} {
		args := append([]string{"status", "--context", "tls", "--insecure-skip-tls-verify"}, tc.args...)
		_, errOut, code := runMain(t, "egressnatctl", args...)
		reqs := tlsAPI.requests()
		if code != 1 || errOut != notInstalled || len(reqs) == 0 {
			t.Errorf("%v: exit %d, %q, %d requests", tc.args, code, errOut, len(reqs))
		} else if got := reqs[0].Header.Get("Authorization"); got != tc.want {
			t.Errorf("%v: Authorization %q, want %q", tc.args, got, tc.want)
		}
	}

	// --request-timeout bounds each request.
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(30 * time.Second):
		}
	}))
	defer slow.Close()
	start := time.Now()
	_, errOut, code = runMain(t, "egressnatctl", "status", "--server", slow.URL, "--request-timeout", "300ms")
	if code != 1 || !strings.Contains(errOut, "cannot reach the Kubernetes API at "+slow.URL) || time.Since(start) > 15*time.Second {
		t.Errorf("--request-timeout 300ms: exit %d after %s, %q", code, time.Since(start), errOut)
	}
}

// TestCommandLine: exit codes and messages of the command line itself,
// per-command help, and the plugin's name.
func TestCommandLine(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "absent"))
	for _, tc := range []struct {
		prog   string
		args   []string
		code   int
		stdout []string // each in stdout
		stderr string   // stderr, exactly
	}{
		{"egressnatctl", []string{"status", "--bogus"}, 2, nil,
			"egressnatctl: unknown flag: --bogus\nSee 'egressnatctl status --help' for usage.\n"},
		// cobra takes status for the value of the flag it does not know.
		{"egressnatctl", []string{"--bogus", "status"}, 2, nil,
			"egressnatctl: unknown flag: --bogus\nSee 'egressnatctl --help' for usage.\n"},
		{"egressnatctl", []string{"explain", "-x"}, 2, nil,
			"egressnatctl: unknown shorthand flag: 'x' in -x\nSee 'egressnatctl explain --help' for usage.\n"},
		{"egressnatctl", []string{"conntrack", "--ip", "nope"}, 2, nil,
			"egressnatctl: invalid argument \"nope\" for \"--ip\" flag: ParseAddr(\"nope\"): unable to parse IP\nSee 'egressnatctl conntrack --help' for usage.\n"},
		{"egressnatctl", []string{"status", "extra"}, 2, nil,
			"egressnatctl: status takes no arguments, got \"extra\"\nSee 'egressnatctl status --help' for usage.\n"},
		{"egressnatctl", []string{"status", "--request-timeout", "soon"}, 2, nil,
			"egressnatctl: --request-timeout \"soon\": want a duration such as 20s, 2m or 0 (no timeout)\nSee 'egressnatctl status --help' for usage.\n"},
		{"egressnatctl", []string{"explain", "pod", "a/b", "-n", "c"}, 2, nil,
			"egressnatctl: explain pod a/b: -n c names another namespace\nSee 'egressnatctl explain --help' for usage.\n"},
		{"egressnatctl", []string{"version", "-o", "xml"}, 2, nil,
			"egressnatctl: -o \"xml\": want text, json or yaml\nSee 'egressnatctl version --help' for usage.\n"},
		{"egressnatctl", []string{"status"}, 1, nil,
			"egressnatctl: no Kubernetes configuration: pass --kubeconfig, set $KUBECONFIG or create ~/.kube/config\n"},
		{"kubectl egressnat", []string{"status", "--bogus"}, 2, nil,
			"kubectl egressnat: unknown flag: --bogus\nSee 'kubectl egressnat status --help' for usage.\n"},

		// Help: the root's lists the commands; each command's its usage,
		// flags and kubectl's flags.
		{"egressnatctl", []string{"--help"}, 0, []string{"Available Commands:", "status", "explain pod NAMESPACE/NAME",
			"ruleset", "conntrack", "prepare-node", "version", "completion", "--context string", "--as string"}, ""},
		{"egressnatctl", []string{"status", "--help"}, 0, []string{"Usage:\n  egressnatctl status [flags]", "-o, --output string",
			"Global Flags:", "--kubeconfig string", "--request-timeout string", `(default "20s")`}, ""},
		{"egressnatctl", []string{"help", "explain"}, 0, []string{"Usage:\n  egressnatctl explain pod (NAMESPACE/NAME | NAME [-n NAMESPACE]) [--to IP] [flags]",
			"--to string", "--gateway-namespaces string", "-n, --namespace string"}, ""},
		{"egressnatctl", []string{"ruleset", "-h"}, 0, []string{"egressnatctl ruleset [flags]", "--netns string", "--mark-mask string", "--all-elements"}, ""},
		{"egressnatctl", []string{"conntrack", "--help"}, 0, []string{"egressnatctl conntrack [flags]", "--ip ip"}, ""},
		{"egressnatctl", []string{"prepare-node", "--help"}, 0, []string{"egressnatctl prepare-node [flags]", "--proc-sys-net string", "--uplink string"}, ""},
		{"egressnatctl", []string{"help", "version"}, 0, []string{"egressnatctl version [flags]", "--client"}, ""},
		{"kubectl egressnat", []string{"explain", "--help"}, 0, []string{"Usage:\n  kubectl egressnat explain pod", "kubectl egressnat explain pod web-0 -n shop"}, ""},
	} {
		stdout, stderr, code := runMain(t, tc.prog, tc.args...)
		if code != tc.code || stderr != tc.stderr {
			t.Errorf("%s %v: exit %d, stderr %q; want %d, %q", tc.prog, tc.args, code, stderr, tc.code, tc.stderr)
		}
		for _, want := range tc.stdout {
			if !strings.Contains(stdout, want) {
				t.Errorf("%s %v: stdout lacks %q:\n%s", tc.prog, tc.args, want, stdout)
			}
		}
	}
}

// TestCompletion: the scripts of each shell, and the completions they ask
// the command for: commands, -o values, kubeconfig contexts.
func TestCompletion(t *testing.T) {
	t.Setenv("KUBECONFIG", writeKubeconfig(t, "https://a.example", "https://b.example", "https://c.example"))
	for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
		stdout, stderr, code := runMain(t, "egressnatctl", "completion", shell)
		if code != 0 || stderr != "" || len(stdout) < 500 || !strings.Contains(stdout, "egressnatctl") {
			t.Errorf("completion %s: exit %d, stderr %q, %d bytes", shell, code, stderr, len(stdout))
		}
	}
	for _, args := range [][]string{{"completion"}, {"completion", "tcsh"}} {
		if _, stderr, code := runMain(t, "egressnatctl", args...); code != 2 || !strings.HasPrefix(stderr, "egressnatctl: ") {
			t.Errorf("%v: exit %d, %q; want 2", args, code, stderr)
		}
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{""}, []string{"completion", "conntrack", "explain", "help", "move", "prepare-node", "ruleset", "status", "version"}},
		{[]string{"explain", ""}, []string{"pod"}},
		{[]string{"status", "-o", ""}, []string{"table", "json", "yaml"}},
		{[]string{"ruleset", "--output", ""}, []string{"text", "json"}},
		{[]string{"status", "--context", ""}, []string{"a", "b", "tls"}},
		{[]string{"--user", ""}, []string{"alice", "bob"}},
	} {
		stdout, _, code := runMain(t, "egressnatctl", append([]string{"__complete"}, tc.args...)...)
		var got []string
		for _, l := range strings.Split(stdout, "\n") {
			if l != "" && !strings.HasPrefix(l, ":") && !strings.HasPrefix(l, "Completion ended") {
				name, _, _ := strings.Cut(l, "\t")
				got = append(got, name)
			}
		}
		if code != 0 || !slices.Equal(got, tc.want) {
			t.Errorf("__complete %q: exit %d, %q, want %q", tc.args, code, got, tc.want)
		}
	}
}

// TestVersion: the client's version alone, then with the server's and the
// images of the egressnat pods, in each format.
func TestVersion(t *testing.T) {
	pod := func(name, component, image string, phase corev1.PodPhase) corev1.Pod {
		return corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "egressnat-system", Labels: map[string]string{componentLabel: component}},
			Spec:   corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: image}}},
			Status: corev1.PodStatus{Phase: phase}}
	}
	api := newFakeAPI(t, false,
		pod("agent-1", "egressnat-agent", "ghcr.io/egressnat/egressnat:v0.1.0", corev1.PodRunning),
		pod("agent-2", "egressnat-agent", "ghcr.io/egressnat/egressnat:v0.2.0", corev1.PodRunning),
		pod("agent-3", "egressnat-agent", "ghcr.io/egressnat/egressnat:v0.1.0", corev1.PodPending),
		pod("agent-old", "egressnat-agent", "ghcr.io/egressnat/egressnat:v0.0.9", corev1.PodFailed),
		pod("operator-1", "egressnat-operator", "registry.local:5000/egressnat@sha256:abcd", corev1.PodRunning),
	)
	t.Setenv("KUBECONFIG", writeKubeconfig(t, api.URL, api.URL, api.URL))
	client := version.Get().String()

	stdout, stderr, code := runMain(t, "egressnatctl", "version", "--client")
	if code != 0 || stderr != "" || stdout != "Client Version: "+client+"\n" || len(api.requests()) != 0 {
		t.Errorf("version --client: exit %d, %q, %q", code, stdout, stderr)
	}

	stdout, stderr, code = runMain(t, "egressnatctl", "version")
	want := "Client Version: " + client + "\nServer Version: v1.37.2\n" +
		"egressnat-agent: v0.1.0 (ghcr.io/egressnat/egressnat:v0.1.0, 2 pods)\n" +
		"egressnat-agent: v0.2.0 (ghcr.io/egressnat/egressnat:v0.2.0, 1 pod)\n" +
		"egressnat-operator: - (registry.local:5000/egressnat@sha256:abcd, 1 pod)\n"
	if code != 0 || stderr != "" || stdout != want {
		t.Errorf("version: exit %d, stderr %q, stdout:\n%s\nwant:\n%s", code, stderr, stdout, want)
	}
	var sawPods bool
	for _, r := range api.requests() {
		if r.URL.Path == "/api/v1/namespaces/egressnat-system/pods" {
			sawPods = r.URL.Query().Get("labelSelector") == componentSelector
		}
	}
	if !sawPods {
		t.Errorf("version: pods not listed in egressnat-system with %q", componentSelector)
	}

	for _, format := range []string{"json", "yaml"} {
		stdout, stderr, code = runMain(t, "egressnatctl", "version", "-o", format, "-n", "other")
		var r VersionReport
		if err := yaml.Unmarshal([]byte(stdout), &r); err != nil {
			t.Fatalf("-o %s: %v\n%s", format, err, stdout)
		}
		if code != 0 || stderr != "" || r.Client.Version != version.Get().Version || r.Server == nil || r.Server.GitVersion != "v1.37.2" ||
			r.Namespace != "other" || len(r.Components) != 3 || r.Components[0] != (ComponentVersion{"egressnat-agent", "v0.1.0", "ghcr.io/egressnat/egressnat:v0.1.0", 2}) {
			t.Errorf("-o %s: exit %d, stderr %q, %+v", format, code, stderr, r)
		}
	}
	if reqs := api.requests(); len(reqs) == 0 || reqs[len(reqs)-1].URL.Path != "/api/v1/namespaces/other/pods" {
		t.Errorf("-n other: pods not listed in other")
	}

	// No egressnat pods.
	var b bytes.Buffer
	if err := WriteVersion(&b, VersionReport{Client: version.Info{Version: "v1", GoVersion: "go1"},
		Server: &apiversion.Info{GitVersion: "v1.37.2"}, Namespace: "egressnat-system"}, "text"); err != nil ||
		b.String() != "Client Version: v1 (go1)\nServer Version: v1.37.2\negressnat: no agent or operator pods in namespace egressnat-system\n" {
		t.Errorf("no pods: %v, %q", err, b.String())
	}

	// No server: the client's version, then the error.
	stdout, stderr, code = runMain(t, "egressnatctl", "version", "--server", "http://127.0.0.1:1")
	if code != 1 || stdout != "Client Version: "+client+"\n" || !strings.HasPrefix(stderr, "egressnatctl: cannot reach the Kubernetes API at http://127.0.0.1:1") {
		t.Errorf("no server: exit %d, %q, %q", code, stdout, stderr)
	}
}

func TestImageTag(t *testing.T) {
	for image, want := range map[string]string{
		"ghcr.io/egressnat/egressnat:v0.1.0":               "v0.1.0",
		"ghcr.io/egressnat/egressnat:v0.1.0@sha256:abcdef": "v0.1.0",
		"ghcr.io/egressnat/egressnat@sha256:abcdef":        "",
		"registry.local:5000/egressnat":                    "",
		"registry.local:5000/egressnat:dev":                "dev",
		"egressnat":                                        "",
	} {
		if got := imageTag(image); got != want {
			t.Errorf("imageTag(%q) = %q, want %q", image, got, want)
		}
	}
}

func TestSplitPodRef(t *testing.T) {
	for _, tc := range []struct {
		ref, flagNS, ns, name, err string
	}{
		{"shop/web", "", "shop", "web", ""},
		{"shop/web", "shop", "shop", "web", ""},
		{"web", "shop", "shop", "web", ""},
		{"web", "", "", "web", ""}, // the context's namespace, if any
		{"shop/web", "other", "", "", "-n other names another namespace"},
		{"/web", "", "", "", "want NAMESPACE/NAME"},
		{"shop/", "", "", "", "want NAMESPACE/NAME"},
		{"a/b/c", "", "", "", "want NAMESPACE/NAME"},
		{"", "shop", "", "", "want NAMESPACE/NAME"},
	} {
		ns, name, err := splitPodRef(tc.ref, tc.flagNS)
		if ns != tc.ns || name != tc.name || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("splitPodRef(%q, %q) = %q, %q, %v; want %q, %q, %q", tc.ref, tc.flagNS, ns, name, err, tc.ns, tc.name, tc.err)
		}
		if _, ok := err.(usageError); err != nil && !ok {
			t.Errorf("splitPodRef(%q, %q): %T is not a usage error", tc.ref, tc.flagNS, err)
		}
	}
}
