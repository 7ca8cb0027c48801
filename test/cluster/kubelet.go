package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A real node: Debian's containerd and runc, the CNI plugins of
// containernetworking-plugins, and a kubelet built from the
// k8s.io/kubernetes module, all inside the node's network namespace
// (nsenter --net, as a node's own processes) and in a mount namespace of the
// node's own, so that what a node keeps on its disk is its own:
//
//   - /var/lib and /var/log are the node's own directories (VarLib and
//     VarLog in its directory, bind-mounted: the CNI's IP allocations,
//     hostPath volumes such as the agent's /var/lib/egressnat, the pods'
//     logs), kept when the node dies as a disk is; /run is an empty tmpfs
//     (containerd's shims and runc state) that vanishes with the node's
//     last process. Nothing is written to the machine's own /run, /var/lib
//     or /var/log;
//   - containerd's root and state, its sockets, the kubelet's root
//     directory and the CNI configuration live in the lab's work directory;
//   - every pod runs under the cgroup root /<lab prefix><node> of every
//     cgroup v1 hierarchy (the machine mounts cgroup v1; PID 1 is not
//     systemd: cgroupfs driver).
//
// What the machine lacks is worked around, and said where: no
// CAP_SYS_RESOURCE (containerd restrict_oom_score_adj, kubelet
// oomScoreAdj 0), no AppArmor.

// PauseImage is the sandbox image every node's containerd uses, built
// offline (test/image) and imported into each node's runtime.
const PauseImage = "registry.k8s.io/pause:egressnat"

// RealNode is a node's container runtime and kubelet.
type RealNode struct {
	Name       string
	Dir        string // the node's directory in the lab's work directory
	Socket     string // containerd's gRPC socket
	CgroupRoot string // e.g. "/enwkworker1"
	Containerd *lab.Proc
	Kubelet    *lab.Proc

	mntNS nsID // the node's mount namespace (containerd's)
}

type nsID struct{ dev, ino uint64 }

func namespaceOf(pid int, kind string) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/%s", pid, kind), &st); err != nil {
		return nsID{}, err
	}
	return nsID{uint64(st.Dev), st.Ino}, nil
}

// cgroupHierarchies lists the cgroup mounts under /sys/fs/cgroup (v1
// controllers, name=systemd and the unified v2 mount of a hybrid layout).
func cgroupHierarchies() ([]string, error) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && (f[2] == "cgroup" || f[2] == "cgroup2") && strings.HasPrefix(f[1], "/sys/fs/cgroup") {
			out = append(out, f[1])
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no cgroup mounts under /sys/fs/cgroup")
	}
	return out, nil
}

// makeCgroupRoot creates root in every hierarchy; in cpuset it copies the
// parent's cpus and mems (an empty cpuset admits no process).
func makeCgroupRoot(root string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		d := filepath.Join(h, root)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			v, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				continue // not the cpuset hierarchy
			}
			if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
				return fmt.Errorf("set %s of %s: %w", f, d, err)
			}
		}
	}
	return nil
}

// removeCgroupRoot kills every process left in root's subtree (every
// hierarchy) and removes its directories bottom-up.
func removeCgroupRoot(root string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for attempt := 0; attempt < 50; attempt++ {
		errs = errs[:0]
		for _, h := range hs {
			top := filepath.Join(h, root)
			if _, err := os.Stat(top); err != nil {
				continue
			}
			var dirs []string
			filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error { //nolint:errcheck
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if b, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
					for _, f := range strings.Fields(string(b)) {
						if pid, err := strconv.Atoi(f); err == nil {
							syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck
						}
					}
				}
				if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
					errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
				}
			}
		}
		if len(errs) == 0 {
			return nil
		}
		if attempt < 49 {
			time.Sleep(100 * time.Millisecond) // processes take a moment to leave a killed cgroup
		}
	}
	return errors.Join(errs...)
}

// killMountNamespace kills every process in mount namespace id (containerd,
// its shims, the kubelet) until none is left.
func killMountNamespace(id nsID) {
	for attempt := 0; attempt < 50; attempt++ {
		ents, _ := os.ReadDir("/proc")
		found := false
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			if ns, err := namespaceOf(pid, "mnt"); err == nil && ns == id {
				syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck
				found = true
			}
		}
		if !found {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const containerdConfig = `version = 2
root = %[1]q
state = %[2]q
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  # The lab machine has no AppArmor and lacks CAP_SYS_RESOURCE.
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[7]q
    max_conf_num = 1
`

const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%[1]s
address: %[2]s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
clusterDNS: [%[3]s]
# cgroup v1, PID 1 not systemd: cgroupfs, under the node's own root.
cgroupDriver: cgroupfs
cgroupRoot: %[4]s
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: ["none"]
# The machine lacks CAP_SYS_RESOURCE.
oomScoreAdj: 0
# The nodes share one disk: eviction by disk pressure would follow the
# machine, not the node.
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 4s
serializeImagePulls: false
resolvConf: %[5]q
`

// cniConfig is the node's CNI network: in routed mode the ptp plugin (a
// veth per pod, a /32 route toward it on the node, as the lab's routed pods
// have); in overlay mode the bridge plugin on the lab's cni0 (the overlay's
// bridge, flannel's layout). host-local allocates from the node's pod CIDR.
// Masquerade stays the lab's (Config.Masquerade), so the CNI adds none.
func cniConfig(mode string, podCIDR netip.Prefix, mtu int, ipamDir string) string {
	ipam := fmt.Sprintf(`{"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}`,
		ipamDir, podCIDR.String())
	plugin := fmt.Sprintf(`{"type": "ptp", "mtu": %d, "ipMasq": false, "ipam": %s}`, mtu, ipam)
	if mode == lab.PodNetworkOverlay {
		plugin = fmt.Sprintf(`{"type": "bridge", "bridge": %q, "isGateway": true, "ipMasq": false, "mtu": %d, "hairpinMode": true, "ipam": %s}`,
			lab.PodBridge, mtu, ipam)
	}
	return fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "egressnat-lab", "plugins": [%s, {"type": "portmap", "capabilities": {"portMappings": true}}]}`, plugin)
}

// startRealNode starts containerd and the kubelet of node n and imports
// images (OCI archives) into its runtime.
func (c *Cluster) startRealNode(ctx context.Context, n *lab.Node, bins apiserver.NodeBinaries, kubeconfig string, images []string) (*RealNode, error) {
	rn := &RealNode{Name: n.Name, Dir: filepath.Join(c.Lab.WorkDir(), "node-"+n.Name), CgroupRoot: "/" + c.Lab.Prefix() + n.Name}
	for _, d := range []string{"root", "state", "opt", "cni-conf", "kubelet", "var-lib", "var-log"} {
		if err := os.MkdirAll(filepath.Join(rn.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	rn.Socket = filepath.Join(rn.Dir, "containerd.sock")
	conf := fmt.Sprintf(containerdConfig, filepath.Join(rn.Dir, "root"), filepath.Join(rn.Dir, "state"), rn.Socket,
		rn.Socket+".ttrpc", filepath.Join(rn.Dir, "opt"), PauseImage, filepath.Join(rn.Dir, "cni-conf"))
	if err := os.WriteFile(filepath.Join(rn.Dir, "containerd.toml"), []byte(conf), 0o644); err != nil {
		return nil, err
	}
	cfg := c.Lab.Config()
	// /var/lib is the node's own tmpfs (see above): host-local keeps its
	// allocations there, as on a real node.
	cni := cniConfig(cfg.PodNetwork, n.PodCIDR, cfg.PodMTU, "/var/lib/cni/networks")
	if err := os.WriteFile(filepath.Join(rn.Dir, "cni-conf", "10-egressnat-lab.conflist"), []byte(cni), 0o644); err != nil {
		return nil, err
	}
	resolv := filepath.Join(rn.Dir, "resolv.conf")
	if err := os.WriteFile(resolv, []byte("nameserver 10.96.0.10\nsearch cluster.local\n"), 0o644); err != nil {
		return nil, err
	}
	kc := fmt.Sprintf(kubeletConfig, rn.Socket, n.IP, ClusterDNS, rn.CgroupRoot, resolv)
	if err := os.WriteFile(filepath.Join(rn.Dir, "kubelet.yaml"), []byte(kc), 0o644); err != nil {
		return nil, err
	}
	if err := makeCgroupRoot(rn.CgroupRoot); err != nil {
		return nil, err
	}
	c.realNodes = append(c.realNodes, rn)
	// containerd, in the node's network namespace and a mount namespace of
	// its own with empty /run, /var/lib and /var/log.
	script := `set -e; mount -t tmpfs -o mode=0755 egressnat-lab /run; mount --bind "$0" /var/lib; mount --bind "$1" /var/log; shift; exec "$@"`
	p, err := c.Lab.StartNsenter(n.NetNS, filepath.Join(c.Lab.WorkDir(), "containerd-"+n.Name+".log"),
		"unshare", "--mount", "--propagation", "slave", "--", "/bin/sh", "-c", script, rn.VarLib(), rn.VarLog(),
		"containerd", "--config", filepath.Join(rn.Dir, "containerd.toml"))
	if err != nil {
		return nil, fmt.Errorf("start containerd on %s: %w", n.Name, err)
	}
	rn.Containerd = p
	if err := waitFor(ctx, 30*time.Second, func() error {
		if !p.Running() {
			return fmt.Errorf("containerd on %s exited: %s", n.Name, tail(p.Log(), 2000))
		}
		_, err := os.Stat(rn.Socket)
		return err
	}); err != nil {
		return nil, err
	}
	if rn.mntNS, err = namespaceOf(p.Pid(), "mnt"); err != nil {
		return nil, fmt.Errorf("containerd's mount namespace on %s: %w", n.Name, err)
	}
	if own, err := namespaceOf(os.Getpid(), "mnt"); err != nil || own == rn.mntNS {
		return nil, fmt.Errorf("containerd on %s shares the machine's mount namespace (%v)", n.Name, err)
	}
	for _, img := range images {
		out, err := exec.CommandContext(ctx, "ctr", "--address", rn.Socket, "-n", "k8s.io", "images", "import", img).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("import %s on %s: %w: %s", img, n.Name, err, out)
		}
	}
	// The kubelet joins containerd's mount namespace.
	args := []string{bins.Kubelet,
		"--config=" + filepath.Join(rn.Dir, "kubelet.yaml"),
		"--kubeconfig=" + kubeconfig,
		"--root-dir=" + filepath.Join(rn.Dir, "kubelet"),
		"--hostname-override=" + n.Name,
		"--node-ip=" + n.IP.String(),
		"--v=1",
	}
	kp, err := c.Lab.StartEnter(n.NetNS, filepath.Join(c.Lab.WorkDir(), "kubelet-"+n.Name+".log"),
		[]string{"nsenter", "--net=/run/netns/" + n.NetNS, fmt.Sprintf("--mount=/proc/%d/ns/mnt", p.Pid()), "--"}, args...)
	if err != nil {
		return nil, fmt.Errorf("start kubelet on %s: %w", n.Name, err)
	}
	rn.Kubelet = kp
	return rn, nil
}

// VarLib is the node's /var/lib, seen from the machine (e.g. the agent's
// state directory is VarLib()/egressnat).
func (rn *RealNode) VarLib() string { return filepath.Join(rn.Dir, "var-lib") }

// VarLog is the node's /var/log.
func (rn *RealNode) VarLog() string { return filepath.Join(rn.Dir, "var-log") }

// stop stops the kubelet, every container and containerd of the node, and
// removes its cgroups. Its tmpfs mounts go with its mount namespace.
func (rn *RealNode) stop() error {
	if rn.Kubelet != nil {
		rn.Kubelet.Stop() //nolint:errcheck
	}
	var errs []error
	if rn.mntNS != (nsID{}) {
		killMountNamespace(rn.mntNS)
	}
	if rn.Containerd != nil {
		rn.Containerd.Kill() //nolint:errcheck
	}
	if err := removeCgroupRoot(rn.CgroupRoot); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ClusterDNS is the kubelets' clusterDNS (no DNS server runs in the lab).
const ClusterDNS = "10.96.0.10"

// apiEndpoints writes the EndpointSlice of the Service default/kubernetes
// (the lab's API server runs with --endpoint-reconciler-type=none): pods
// reach the API server at its ClusterIP through kube-proxy, as in-cluster
// clients do.
func (c *Cluster) apiEndpoints(ctx context.Context, addr netip.Addr, port int32) error {
	name, proto := "https", corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{
			discoveryv1.LabelServiceName: "kubernetes", discoveryv1.LabelManagedBy: "egressnat-lab"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr.String()}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Protocol: &proto, Port: &port}},
	}
	_, err := c.Client.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create the kubernetes service's endpoints: %w", err)
	}
	return nil
}

// waitFor polls check every 100 ms until it returns nil or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after %s: %w", timeout, err)
		case <-t.C:
		}
	}
}

// KillRealNode makes node die as a machine does: its kubelet, every
// container (the egressnat agent among them) and containerd are killed at
// once, and its cable is pulled. Its kernel state (nftables, routes,
// addresses) and its disk (VarLib) stay as they were.
func (c *Cluster) KillRealNode(node string) error {
	rn := c.RealNodes[node]
	if rn == nil {
		return fmt.Errorf("no real node %s", node)
	}
	if err := c.Lab.SetLinkDown(node); err != nil {
		return err
	}
	if rn.Kubelet != nil {
		rn.Kubelet.Kill() //nolint:errcheck
	}
	return rn.stop()
}
