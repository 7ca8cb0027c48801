package apiserver

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Options say where and how to run the control plane. The zero value runs
// it on loopback in the current network namespace.
type Options struct {
	// Dir holds data, keys, certificates and logs; a temporary directory
	// (removed by Stop) when empty.
	Dir string
	// ExecPrefix runs etcd and kube-apiserver through a wrapper, e.g.
	// {"ip", "netns", "exec", "enat-cp1"} to run them inside a lab host.
	ExecPrefix []string
	// Address the API server binds and advertises; 127.0.0.1 by default.
	Address string
	// Port of the API server; a free port when zero and no ExecPrefix is
	// set, 6443 otherwise.
	Port int
	// Reach turns the in-network "host:port" of the API server into an
	// address the test process can dial (e.g. a loopback relay into a
	// network namespace). Identity when nil.
	Reach func(hostPort string) (string, error)
	// Log receives the processes' output; discarded when nil (it is also
	// kept in Dir/*.log).
	Log io.Writer
	// Floor runs the kube-apiserver and kubectl of FloorKubeVersion, the
	// oldest release egressnat supports, instead of KubeVersion's.
	Floor bool
	// ExtraArgs are added to kube-apiserver's flags (later flags win).
	ExtraArgs []string
}

// Server is a running etcd plus kube-apiserver.
type Server struct {
	// URL reaches the API server from the test process.
	URL string
	// InNetworkURL reaches it from the network it runs in (lab nodes).
	InNetworkURL string
	// AdminToken authenticates as a member of system:masters.
	AdminToken string
	// Kubeconfig is a kubeconfig file for URL with the admin token.
	Kubeconfig string
	// Kubectl is the path of the kubectl binary built with the server.
	KubectlPath string
	// Dir holds the server's data and logs.
	Dir string

	procs   []*exec.Cmd
	opts    Options
	apiArgv []string // kube-apiserver's command line, for restarts
	tmpDir  bool
	stopped sync.Once
}

// Start runs etcd and kube-apiserver and waits until the API server is
// ready. Call Stop when done; processes also die with the test process.
func Start(ctx context.Context, o Options) (_ *Server, err error) {
	binaries := Binaries
	if o.Floor {
		binaries = FloorBinaries
	}
	apiserverBin, kubectlBin, err := binaries()
	if err != nil {
		return nil, err
	}
	etcdBin, err := Etcd()
	if err != nil {
		return nil, err
	}
	s := &Server{KubectlPath: kubectlBin, Dir: o.Dir, opts: o}
	if s.Dir != "" {
		if err := os.MkdirAll(s.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("create dir: %w", err)
		}
	} else {
		if s.Dir, err = os.MkdirTemp("", "egressnat-apiserver-"); err != nil {
			return nil, fmt.Errorf("create dir: %w", err)
		}
		s.tmpDir = true
	}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	addr := o.Address
	if addr == "" {
		addr = "127.0.0.1"
	}
	inNS := len(o.ExecPrefix) > 0
	port := o.Port
	etcdPort, peerPort := 2379, 2380
	if !inNS {
		if port == 0 {
			if port, err = freePort(); err != nil {
				return nil, err
			}
		}
		if etcdPort, err = freePort(); err != nil {
			return nil, err
		}
		if peerPort, err = freePort(); err != nil {
			return nil, err
		}
	} else if port == 0 {
		port = 6443
	}
	if err := s.writeCredentials(); err != nil {
		return nil, err
	}

	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peerPort)
	if err := s.spawn(o, "etcd", etcdBin,
		"--name=egressnat-test",
		"--data-dir="+filepath.Join(s.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=egressnat-test="+peerURL,
		"--log-level=warn",
	); err != nil {
		return nil, err
	}
	hostPort := net.JoinHostPort(addr, strconv.Itoa(port))
	s.apiArgv = []string{apiserverBin,
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + addr,
		"--advertise-address=" + addr,
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(s.Dir, "certs"),
		"--token-auth-file=" + filepath.Join(s.Dir, "tokens.csv"),
		"--service-account-key-file=" + filepath.Join(s.Dir, "sa.key"),
		"--service-account-signing-key-file=" + filepath.Join(s.Dir, "sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--v=1",
	}
	s.apiArgv = append(s.apiArgv, o.ExtraArgs...)
	if err := s.spawn(o, "kube-apiserver", s.apiArgv[0], s.apiArgv[1:]...); err != nil {
		return nil, err
	}
	s.InNetworkURL = "https://" + hostPort
	local := hostPort
	if o.Reach != nil {
		if local, err = o.Reach(hostPort); err != nil {
			return nil, fmt.Errorf("reach api server: %w", err)
		}
	}
	s.URL = "https://" + local
	s.Kubeconfig = filepath.Join(s.Dir, "admin.kubeconfig")
	if err := WriteKubeconfig(s.Kubeconfig, s.URL, s.AdminToken); err != nil {
		return nil, err
	}
	if err := s.waitReady(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// Config returns an admin client configuration.
func (s *Server) Config() *rest.Config {
	return &rest.Config{
		Host:            s.URL,
		BearerToken:     s.AdminToken,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS:             200,
		Burst:           400,
	}
}

// Client returns an admin clientset.
func (s *Server) Client() (*kubernetes.Clientset, error) {
	return kubernetes.NewForConfig(s.Config())
}

// Kubectl runs the built kubectl against the server as admin and returns
// its standard output and standard error.
func (s *Server) Kubectl(ctx context.Context, stdin io.Reader, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, s.KubectlPath, append([]string{"--kubeconfig=" + s.Kubeconfig}, args...)...)
	var out, errb strings.Builder
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

// StopAPIServer stops kube-apiserver only (etcd keeps the data): an API
// server outage.
func (s *Server) StopAPIServer() {
	for i, p := range s.procs {
		if filepath.Base(p.Path) != "kube-apiserver" && !containsArg(p.Args, s.apiArgv[0]) {
			continue
		}
		stopProcess(p)
		s.procs = append(s.procs[:i], s.procs[i+1:]...)
		return
	}
}

// StartAPIServer starts kube-apiserver again after StopAPIServer and waits
// until it is ready.
func (s *Server) StartAPIServer(ctx context.Context) error {
	if err := s.spawn(s.opts, "kube-apiserver", s.apiArgv[0], s.apiArgv[1:]...); err != nil {
		return err
	}
	return s.waitReady(ctx)
}

func containsArg(args []string, a string) bool {
	for _, x := range args {
		if x == a {
			return true
		}
	}
	return false
}

// Stop ends the processes (API server first) and removes a temporary Dir.
func (s *Server) Stop() {
	s.stopped.Do(func() {
		for i := len(s.procs) - 1; i >= 0; i-- {
			stopProcess(s.procs[i])
		}
		if s.tmpDir {
			os.RemoveAll(s.Dir)
		}
	})
}

// WriteKubeconfig writes a kubeconfig for server (TLS not verified: the
// test server's certificate is self-signed) authenticating with token.
func WriteKubeconfig(path, server, token string) error {
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: egressnat
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: egressnat
  user:
    token: %s
contexts:
- name: egressnat
  context:
    cluster: egressnat
    user: egressnat
current-context: egressnat
`, server, token)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

func (s *Server) writeCredentials() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generate service account key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(filepath.Join(s.Dir, "sa.key"), keyPEM, 0o600); err != nil {
		return fmt.Errorf("write service account key: %w", err)
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	s.AdminToken = hex.EncodeToString(b)
	tokens := fmt.Sprintf("%s,admin,admin-uid,\"system:masters\"\n", s.AdminToken)
	if err := os.WriteFile(filepath.Join(s.Dir, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}
	return os.MkdirAll(filepath.Join(s.Dir, "certs"), 0o755)
}

func (s *Server) spawn(o Options, name, bin string, args ...string) error {
	logf, err := os.OpenFile(filepath.Join(s.Dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("create %s log: %w", name, err)
	}
	var w io.Writer = logf
	if o.Log != nil {
		w = io.MultiWriter(logf, o.Log)
	}
	argv := append(append(append([]string{}, o.ExecPrefix...), bin), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = w, w
	// Own process group, and killed when the test process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	go func() { cmd.Wait(); logf.Close() }() //nolint:errcheck
	s.procs = append(s.procs, cmd)
	return nil
}

func (s *Server) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cfg := s.Config()
	rt, err := rest.TransportFor(cfg)
	if err != nil {
		return err
	}
	hc := &http.Client{Transport: rt, Timeout: 2 * time.Second}
	var last string
	for {
		for _, p := range s.procs {
			if p.ProcessState != nil {
				return fmt.Errorf("%s exited: %s; see %s", filepath.Base(p.Path), p.ProcessState, s.Dir)
			}
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/readyz", nil)
		resp, err := hc.Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("status %d: %s", resp.StatusCode, lastLines(string(body), 3))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("api server not ready (%s); logs in %s: %w", last, s.Dir, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func stopProcess(cmd *exec.Cmd) {
	if cmd.Process == nil {
		return
	}
	pgid := cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM) //nolint:errcheck
	done := make(chan struct{})
	go func() {
		for cmd.ProcessState == nil {
			time.Sleep(20 * time.Millisecond)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL) //nolint:errcheck
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// InstallCRDs applies the kustomization dir (manifests/crds) with kubectl and waits until
// the API server serves them.
func (s *Server) InstallCRDs(ctx context.Context, dir string) error {
	// -k: the directory is a kustomization (its kustomization.yaml is not
	// a resource for -f).
	if out, errOut, err := s.Kubectl(ctx, nil, "apply", "--server-side", "-k", dir); err != nil {
		return fmt.Errorf("apply crds: %w: %s%s", err, out, errOut)
	}
	// kubectl wait takes no -k: name the CRD files (kustomization.yaml
	// aside).
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return err
	}
	args := []string{"wait", "--for=condition=Established", "--timeout=60s"}
	for _, f := range files {
		if filepath.Base(f) != "kustomization.yaml" {
			args = append(args, "-f", f)
		}
	}
	if out, errOut, err := s.Kubectl(ctx, nil, args...); err != nil {
		return fmt.Errorf("wait for crds: %w: %s%s", err, out, errOut)
	}
	return nil
}
