package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func envFrom(c corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			return e.ValueFrom.FieldRef.FieldPath
		}
	}
	return ""
}

func probeOK(t *testing.T, what string, p *corev1.Probe, path string, port int32, ports []corev1.ContainerPort) {
	t.Helper()
	if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != path {
		t.Errorf("%s: want an HTTP GET %s probe, got %+v", what, path, p)
		return
	}
	got := p.HTTPGet.Port.IntVal
	if p.HTTPGet.Port.StrVal != "" {
		for _, cp := range ports {
			if cp.Name == p.HTTPGet.Port.StrVal {
				got = cp.ContainerPort
			}
		}
	}
	if got != port {
		t.Errorf("%s: probe port %v is %d, want %d", what, p.HTTPGet.Port, got, port)
	}
}

func hasArg(c corev1.Container, arg string) bool { return slices.Contains(c.Args, arg) }

// noPrivilege: never privileged, no escalation, every capability dropped
// but add, seccomp on.
func noPrivilege(t *testing.T, c corev1.Container, add ...corev1.Capability) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Fatalf("%s: no securityContext", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s: privileged", c.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation must be false", c.Name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("%s: must drop ALL capabilities, got %+v", c.Name, sc.Capabilities)
	} else if !slices.Equal(sc.Capabilities.Add, add) {
		t.Errorf("%s: adds capabilities %v, want exactly %v", c.Name, sc.Capabilities.Add, add)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: root filesystem must be read-only", c.Name)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: want seccomp RuntimeDefault", c.Name)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("%s: want cpu and memory requests and a memory limit, got %+v", c.Name, c.Resources)
	}
}

// TestAgentDaemonSet: hostNetwork, on every node, NET_ADMIN and NET_RAW
// only (never privileged), node name and namespace from the downward API,
// probes on the health port, requests and limits.
func TestAgentDaemonSet(t *testing.T) {
	ds := daemonSet(t)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("agent: hostNetwork must be true")
	}
	if spec.ServiceAccountName != "egressnat-agent" {
		t.Errorf("agent: serviceAccountName %q", spec.ServiceAccountName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("agent: want one toleration {operator: Exists} to run on every node, got %+v", spec.Tolerations)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("agent: %d containers", len(spec.Containers))
	}
	c := spec.Containers[0]
	noPrivilege(t, c, "NET_ADMIN", "NET_RAW")
	if c.SecurityContext.RunAsUser == nil || *c.SecurityContext.RunAsUser != 0 {
		t.Errorf("agent: runs as root (uid 0) for netlink: want runAsUser 0 stated explicitly")
	}
	if got := envFrom(c, "NODE_NAME"); got != "spec.nodeName" {
		t.Errorf("agent: NODE_NAME from %q, want spec.nodeName", got)
	}
	if got := envFrom(c, "POD_NAMESPACE"); got != "metadata.namespace" {
		t.Errorf("agent: POD_NAMESPACE from %q, want metadata.namespace", got)
	}
	// Its pod's owner is the DaemonSet it watches to tell an uninstall.
	if got := envFrom(c, "POD_NAME"); got != "metadata.name" {
		t.Errorf("agent: POD_NAME from %q, want metadata.name", got)
	}
	if got := envFrom(c, "HOST_IP"); got != "status.hostIP" {
		t.Errorf("agent: HOST_IP from %q, want status.hostIP", got)
	}
	// On the node's IP only, not on every address of the node.
	for _, a := range []string{"--health-addr=$(HOST_IP):9796", "--health-probe-addr=$(HOST_IP):9797"} {
		if !hasArg(c, a) {
			t.Errorf("agent: args %v lack %s", c.Args, a)
		}
	}
	probeOK(t, "agent liveness", c.LivenessProbe, "/healthz", 9796, c.Ports)
	probeOK(t, "agent readiness", c.ReadinessProbe, "/readyz", 9796, c.Ports)
	if !slices.Equal(c.Command, []string{"/egressnat-agent"}) {
		t.Errorf("agent: command %v", c.Command)
	}
	for _, ic := range spec.InitContainers {
		noPrivilege(t, ic, "NET_ADMIN")
	}
	// The only host paths are /proc/sys/net, for the init container and
	// for the agent to restore the sysctls on an uninstall, and the
	// agent's state directory (kept across reboots for the guard table,
	// and the sysctls' values before egressnat), which the agent mounts
	// at the path its --state-dir names. Nothing else.
	stateVolume, sysVolume := "", ""
	for _, v := range spec.Volumes {
		switch {
		case v.HostPath == nil:
		case v.HostPath.Path == "/proc/sys/net":
			sysVolume = v.Name
		case v.HostPath.Path == "/var/lib/egressnat" && v.HostPath.Type != nil && *v.HostPath.Type == corev1.HostPathDirectoryOrCreate:
			stateVolume = v.Name
		default:
			t.Errorf("agent: hostPath volume %s", v.HostPath.Path)
		}
	}
	if stateVolume == "" {
		t.Error("agent: no hostPath volume /var/lib/egressnat (DirectoryOrCreate) for --state-dir")
	}
	for _, vm := range c.VolumeMounts {
		switch {
		case vm.Name == stateVolume && vm.MountPath == "/var/lib/egressnat" && !vm.ReadOnly:
		case vm.Name == sysVolume && vm.MountPath == "/host/proc/sys/net" && !vm.ReadOnly:
		default:
			t.Errorf("agent container mounts %s (%s); it needs only its state directory and the host's /proc/sys/net", vm.MountPath, vm.Name)
		}
	}
	for _, a := range []string{"--state-dir=/var/lib/egressnat", "--proc-sys-net=/host/proc/sys/net"} {
		if !hasArg(c, a) {
			t.Errorf("agent: args %v lack %s", c.Args, a)
		}
	}
}

// TestOperatorDeployment: two replicas on different nodes, leader
// election, hostNetwork (it probes agents over the node network), non-root.
func TestOperatorDeployment(t *testing.T) {
	d := deployment(t)
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("operator: replicas %v, want 2", d.Spec.Replicas)
	}
	spec := d.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("operator: hostNetwork must be true")
	}
	if spec.ServiceAccountName != "egressnat-operator" {
		t.Errorf("operator: serviceAccountName %q", spec.ServiceAccountName)
	}
	aa := spec.Affinity
	if aa == nil || aa.PodAntiAffinity == nil || len(aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) != 1 ||
		aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].TopologyKey != "kubernetes.io/hostname" {
		t.Errorf("operator: want required pod anti-affinity on kubernetes.io/hostname, got %+v", aa)
	} else if sel := aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].LabelSelector; sel == nil ||
		sel.MatchLabels["app.kubernetes.io/name"] != d.Spec.Template.Labels["app.kubernetes.io/name"] {
		t.Errorf("operator: anti-affinity selector %+v does not select its own pods", sel)
	}
	c := spec.Containers[0]
	noPrivilege(t, c)
	if sc := c.SecurityContext; sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Error("operator: must run as non-root")
	}
	if envFrom(c, "POD_NAME") != "metadata.name" || envFrom(c, "POD_NAMESPACE") != "metadata.namespace" {
		t.Errorf("operator: POD_NAME and POD_NAMESPACE must come from the downward API: %+v", c.Env)
	}
	if got := envFrom(c, "HOST_IP"); got != "status.hostIP" {
		t.Errorf("operator: HOST_IP from %q, want status.hostIP", got)
	}
	for _, a := range []string{"--health-addr=$(HOST_IP):9795", "--probe-port=9797", "--leader-lease-duration=", "--leader-renew-deadline=", "--leader-retry-period="} {
		if !slices.ContainsFunc(c.Args, func(s string) bool { return strings.HasPrefix(s, a) }) {
			t.Errorf("operator: args %v lack %s", c.Args, a)
		}
	}
	probeOK(t, "operator liveness", c.LivenessProbe, "/healthz", 9795, c.Ports)
	probeOK(t, "operator readiness", c.ReadinessProbe, "/readyz", 9795, c.Ports)
	if !slices.Equal(c.Command, []string{"/egressnat-operator"}) {
		t.Errorf("operator: command %v", c.Command)
	}
}

// pendingFlags are flags the manifests use that the binaries are about to
// get (the metrics and health server of cmd/internal/metrics). Remove an
// entry once the binary defines it: the test then holds it to the binary.
var pendingFlags = map[string]map[string]bool{}

// TestFlagsExist: every flag the manifests pass is one the binary defines
// (read from its -h output), and egressnatctl's init container command
// runs.
func TestFlagsExist(t *testing.T) {
	needServer(t) // before the build: the manifests are rendered with kubectl
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "./cmd/egressnat-agent", "./cmd/egressnat-operator", "./cmd/egressnatctl")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	defined := func(name string) map[string]bool {
		out, _ := exec.Command(filepath.Join(bin, name), "-h").CombinedOutput()
		flags := map[string]bool{}
		for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
			flags[m[1]] = true
		}
		if len(flags) == 0 {
			t.Fatalf("%s -h printed no flags:\n%s", name, out)
		}
		return flags
	}
	ds, d := daemonSet(t), deployment(t)
	for _, c := range []corev1.Container{ds.Spec.Template.Spec.Containers[0], d.Spec.Template.Spec.Containers[0]} {
		name := strings.TrimPrefix(c.Command[0], "/")
		flags := defined(name)
		for _, a := range c.Args {
			f := strings.TrimLeft(strings.SplitN(a, "=", 2)[0], "-")
			switch {
			case flags[f]:
			case pendingFlags[name][f]:
				t.Logf("%s: --%s is not defined yet (pending)", name, f)
			default:
				t.Errorf("%s: the manifest passes --%s, which the binary does not define", name, f)
			}
		}
	}
	for _, ic := range ds.Spec.Template.Spec.InitContainers {
		// Run the init container's command against a fake /proc/sys/net,
		// with its environment, its state directory a temporary one.
		fake, state := t.TempDir(), t.TempDir()
		env := os.Environ()
		for _, e := range ic.Env {
			if e.Name == "EGRESSNAT_STATE_DIR" {
				e.Value = state
			}
			env = append(env, e.Name+"="+e.Value)
		}
		for p, v := range map[string]string{"ipv4/conf/all/send_redirects": "1", "ipv4/conf/default/send_redirects": "1",
			"ipv4/conf/eth0/send_redirects": "1", "ipv4/conf/eth0/src_valid_mark": "0", "netfilter/nf_conntrack_tcp_be_liberal": "0"} {
			os.MkdirAll(filepath.Join(fake, filepath.Dir(p)), 0o755)    //nolint:errcheck
			os.WriteFile(filepath.Join(fake, p), []byte(v+"\n"), 0o644) //nolint:errcheck
		}
		args := slices.Clone(ic.Command[1:])
		for i, a := range args {
			if strings.HasPrefix(a, "--proc-sys-net=") {
				args[i] = "--proc-sys-net=" + fake
			}
		}
		// On a node the uplink is the default route's interface; this
		// machine's is not the fake's.
		args = append(args, "--uplink=eth0")
		cmd := exec.Command(filepath.Join(bin, strings.TrimPrefix(ic.Command[0], "/")), args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("init container %s %v: %v\n%s", ic.Command[0], args, err, out)
		}
		if b, _ := os.ReadFile(filepath.Join(fake, "ipv4/conf/eth0/send_redirects")); strings.TrimSpace(string(b)) != "0" {
			t.Errorf("init container did not clear send_redirects: %q", b)
		}
		if b, _ := os.ReadFile(filepath.Join(fake, "ipv4/conf/eth0/src_valid_mark")); strings.TrimSpace(string(b)) != "1" {
			t.Errorf("init container did not set src_valid_mark on the uplink: %q", b)
		}
		// The values before, for the agent to restore on an uninstall.
		if b, err := os.ReadFile(filepath.Join(state, "sysctls-before")); err != nil || !strings.Contains(string(b), "ipv4/conf/eth0/src_valid_mark\t0\t1\n") {
			t.Errorf("init container did not record the sysctls' values before: %q %v", b, err)
		}
	}
}
