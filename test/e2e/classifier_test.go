package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

// TestClassifier: the agents run the lab mode's pod classifier and say so
// (Lease annotation, metric). With the eBPF classifier, a selected pod is
// in its node's pinned map, the program is attached to its interface, and
// pre-src holds no pod address; steering works. An agent asked for the
// eBPF classifier where it cannot run (no bpffs at --bpf-dir) falls back
// to nftables, says why on its Lease and in its metric, and steers the
// pod all the same; restarted as before, it takes the mode's classifier
// again.
// classifierAnnotation is kube.AnnotationClassifier (an internal package).
const classifierAnnotation = "egressnat.io/classifier"

func TestClassifier(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)
	backend := cluster.ModeClassifier(os.Getenv(ModeEnv))
	ns := c.Lab.Node(p.Node).NetNS

	expect := func(wantBackend, annotationPrefix string) {
		t.Helper()
		err := cluster.Poll(20*time.Second, 100*time.Millisecond, func() error {
			lease, err := c.Client.CoordinationV1().Leases(cluster.SystemNamespace).Get(context.Background(),
				"egressnat-agent-"+p.Node, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if got := lease.Annotations[classifierAnnotation]; !strings.HasPrefix(got, annotationPrefix) {
				return fmt.Errorf("lease annotation %s=%q, want %q...", classifierAnnotation, got, annotationPrefix)
			}
			_, body, err := tryGet(ns, cluster.AgentHealthPort, "/metrics")
			if err != nil {
				return err // the agent just restarted
			}
			for _, b := range []string{"nft", "ebpf"} {
				want := 0.0
				if b == wantBackend {
					want = 1
				}
				if v, ok := metric(body, `egressnat_agent_classifier\{backend="`+b+`"\}`); !ok || v != want {
					return fmt.Errorf("egressnat_agent_classifier{backend=%q} = %v (%v), want %v", b, v, ok, want)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	expect(backend, backend)
	preSrc, err := c.Lab.Exec(ctxT(t), ns, "nft", "list", "map", "ip", "egressnat", "pre-src")
	if err != nil {
		t.Fatal(err)
	}
	if hasPod := strings.Contains(string(preSrc), p.IP.String()); hasPod != (backend == "nft") {
		t.Fatalf("classifier %s: pod %s in pre-src: %v\n%s", backend, p.IP, hasPod, preSrc)
	}
	if backend == "ebpf" {
		var snap bpf.Snapshot
		if err := lab.Do(ns, func() (err error) { snap, err = bpf.Inspect(c.BPFDir(p.Node)); return err }); err != nil {
			t.Fatal(err)
		}
		if _, ok := snap.Entries[p.IP]; !ok || len(snap.Interfaces) == 0 {
			t.Fatalf("pinned classifier of %s: pod %s in the map: %v; attached to %v", p.Node, p.IP, ok, snap.Interfaces)
		}
	}

	// No bpffs at --bpf-dir: the nftables classifier, and why.
	notBPF := filepath.Join(t.TempDir(), "egressnat")
	restart := func(extra ...string) {
		t.Helper()
		if err := c.Agents[p.Node].Stop(); err != nil {
			t.Logf("stop agent %s: %v", p.Node, err)
		}
		if err := c.StartAgent(p.Node, extra...); err != nil {
			t.Fatal(err)
		}
	}
	restart("--classifier=ebpf", "--bpf-dir="+notBPF)
	t.Cleanup(func() { restart() })
	expect("nft", "nft; ebpf unavailable: ")
	keepSource(t, p, ext1(), fip100)

	restart()
	expect(backend, backend)
	keepSource(t, p, ext1(), fip100)
}
