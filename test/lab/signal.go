package lab

import "syscall"

// Signal sends sig to the process group of the current run and reports
// whether it was running, e.g. SIGSTOP and SIGCONT to starve a process of
// CPU for a while. A process stopped this way must be continued before
// Stop can end it gracefully (Kill works either way).
func (p *Proc) Signal(sig syscall.Signal) bool {
	_, running := p.signal(sig)
	return running
}
