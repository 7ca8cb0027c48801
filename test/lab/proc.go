package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a long-lived process running inside a lab namespace, in its own
// process group. The lab kills it (and its group) on Close; it also dies
// with the test process (SIGKILL as parent-death signal).
type Proc struct {
	NetNS   string
	Args    []string
	LogPath string

	// enter is the command that enters NetNS and runs Args; "ip netns
	// exec <ns>" when empty.
	enter []string

	lab  *Lab
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	err  error // wait result of the last run
}

func (p *Proc) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.lab != nil && p.lab.isClosed() {
		return errors.New("lab: closed")
	}
	f, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(f, "=== %s start in %s: %s\n", time.Now().Format(time.RFC3339Nano), p.NetNS, strings.Join(p.Args, " "))
	enter := p.enter
	if len(enter) == 0 {
		enter = []string{"ip", "netns", "exec", p.NetNS}
	}
	argv := append(append([]string(nil), enter...), p.Args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("lab: start %v in %s: %w", p.Args, p.NetNS, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.err = cmd, done, nil
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		if lf, ferr := os.OpenFile(p.LogPath, os.O_WRONLY|os.O_APPEND, 0); ferr == nil {
			fmt.Fprintf(lf, "=== %s exit: %v\n", time.Now().Format(time.RFC3339Nano), err)
			lf.Close()
		}
		close(done)
	}()
	return nil
}

// Pid is the process id of the current run (0 before the first start).
func (p *Proc) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Done is closed when the current run has exited.
func (p *Proc) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Running tells whether the current run has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.Done():
		return false
	default:
		return true
	}
}

// Err is the exit error of the last run once it has exited.
func (p *Proc) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// signal sends sig to the process group of the current run if it runs.
func (p *Proc) signal(sig syscall.Signal) (done <-chan struct{}, running bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return nil, false
	}
	select {
	case <-p.done:
		return p.done, false
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, sig)
	return p.done, true
}

// Kill kills the process group with SIGKILL and waits for the exit.
func (p *Proc) Kill() error {
	done, running := p.signal(syscall.SIGKILL)
	if !running {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("lab: %v in %s did not die", p.Args, p.NetNS)
	}
}

// Stop sends SIGTERM to the process group, waits up to 5 s, then kills it.
func (p *Proc) Stop() error {
	done, running := p.signal(syscall.SIGTERM)
	if !running {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-time.After(5 * time.Second):
		return p.Kill()
	}
}

// Restart stops the process if it runs and starts it again with the same
// arguments, namespace and log file.
func (p *Proc) Restart() error {
	if err := p.Stop(); err != nil {
		return err
	}
	return p.start()
}

// Log returns the content of the log file (stdout and stderr of all runs).
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(log %s: %v)", p.LogPath, err)
	}
	return string(b)
}

// tail returns at most n bytes from the end of the log.
func (p *Proc) tail(n int64) string {
	f, err := os.Open(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(log %s: %v)", p.LogPath, err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// Exec runs argv inside lab namespace ns and returns its combined output.
// A non-zero exit is an error that includes the output.
func (l *Lab) Exec(ctx context.Context, ns string, argv ...string) ([]byte, error) {
	if err := l.checkNS(ns); err != nil {
		return nil, err
	}
	if len(argv) == 0 {
		return nil, errors.New("lab: Exec without command")
	}
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, argv...)...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("lab: in %s: %s: %w: %s", ns, strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Start runs argv as a long-lived process inside lab namespace ns, with
// stdout and stderr appended to logPath (a file in the lab's work directory
// when empty). The lab kills it on Close.
func (l *Lab) Start(ns, logPath string, argv ...string) (*Proc, error) {
	return l.start(ns, logPath, nil, argv)
}

// StartNsenter is Start with the process entering ns by "nsenter
// --net=/run/netns/<ns>" instead of "ip netns exec": only the network
// namespace changes, the mounts (/sys, cgroups) stay the host's, as for a
// hostNetwork pod such as kube-proxy or a kubelet.
func (l *Lab) StartNsenter(ns, logPath string, argv ...string) (*Proc, error) {
	if err := l.checkNS(ns); err != nil {
		return nil, err
	}
	return l.start(ns, logPath, []string{"nsenter", "--net=" + netnsDir + "/" + ns, "--"}, argv)
}

// StartEnter is Start with the process entered into ns by the command
// enter (e.g. nsenter with more namespaces than the network's); enter must
// put it into ns's network namespace.
func (l *Lab) StartEnter(ns, logPath string, enter []string, argv ...string) (*Proc, error) {
	if len(enter) == 0 {
		return nil, errors.New("lab: StartEnter without enter command")
	}
	return l.start(ns, logPath, enter, argv)
}

func (l *Lab) start(ns, logPath string, enter, argv []string) (*Proc, error) {
	if err := l.checkNS(ns); err != nil {
		return nil, err
	}
	if len(argv) == 0 {
		return nil, errors.New("lab: Start without command")
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: closed")
	}
	if logPath == "" {
		l.procSeq++
		base := argv[0]
		if i := strings.LastIndexByte(base, '/'); i >= 0 {
			base = base[i+1:]
		}
		logPath = fmt.Sprintf("%s/%s-%s-%d.log", l.workDir, ns, base, l.procSeq)
	}
	p := &Proc{NetNS: ns, Args: append([]string(nil), argv...), LogPath: logPath, lab: l, enter: enter}
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	if err := p.start(); err != nil {
		return nil, err
	}
	return p, nil
}
