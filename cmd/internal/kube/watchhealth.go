package kube

import (
	"errors"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/watch"
)

// WatchHealth tracks whether each informer's watch is current: an informer
// is stale from a failed list or watch, or a watch that ended, until its
// next watch starts. client-go's reflector waits up to 30 s before it lists
// again after repeated failures (its backoff is not configurable through a
// shared informer), and meanwhile its cache serves an old state silently;
// a caller that must not act on an old state (the agent, for the floating
// IPs it holds) asks Stale and reads the API itself.
//
// The zero value is ready to use; a nil *WatchHealth reports nothing stale.
type WatchHealth struct {
	mu    sync.Mutex
	stale map[string]staleSince
	// OnChange, when set, is called (outside the lock) when an informer
	// turns stale, when the reason it is stale turns from an ended watch
	// into an error, and when it is current again (stale false; err is the
	// last reason it was stale, since when it was).
	OnChange func(informer string, stale bool, err error, since time.Time)
}

type staleSince struct {
	at  time.Time
	err error
}

// Stale reports whether the named informer's cache may be behind the API,
// and since when.
func (w *WatchHealth) Stale(informer string) (bool, time.Time) {
	if w == nil {
		return false, time.Time{}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	s, ok := w.stale[informer]
	return ok, s.at
}

// failed marks the informer stale (a failed list or watch, or an ended
// watch).
func (w *WatchHealth) failed(informer string, err error) {
	if w == nil {
		return
	}
	w.mu.Lock()
	if w.stale == nil {
		w.stale = map[string]staleSince{}
	}
	s, was := w.stale[informer]
	notify := !was || (errors.Is(s.err, ErrWatchEnded) && !errors.Is(err, ErrWatchEnded))
	if !was {
		s.at = time.Now()
	}
	if notify {
		s.err = err
		w.stale[informer] = s
	}
	f := w.OnChange
	w.mu.Unlock()
	if notify && f != nil {
		f(informer, true, err, s.at)
	}
}

// watching marks the informer current: its watch started, from the
// resource version of its last list or event.
func (w *WatchHealth) watching(informer string) {
	if w == nil {
		return
	}
	w.mu.Lock()
	s, was := w.stale[informer]
	delete(w.stale, informer)
	f := w.OnChange
	w.mu.Unlock()
	if was && f != nil {
		f(informer, false, s.err, s.at)
	}
}

// ErrWatchEnded: a watch's result channel closed without the reflector
// stopping it (the API server went away, or closed it at its timeout, as
// it does every few minutes), or it sent an error.
var ErrWatchEnded = errors.New("watch ended")

// trackedWatch marks its informer stale when its result channel closes
// without Stop: the reflector then watches again (current again) or, after
// an error, waits and lists again (stale meanwhile).
type trackedWatch struct {
	watch.Interface
	out     chan watch.Event
	stopped chan struct{}
	once    sync.Once
}

func (w *WatchHealth) track(informer string, in watch.Interface) watch.Interface {
	if w == nil {
		return in
	}
	t := &trackedWatch{Interface: in, out: make(chan watch.Event), stopped: make(chan struct{})}
	go func() {
		defer close(t.out)
		for ev := range in.ResultChan() {
			if ev.Type == watch.Error {
				w.failed(informer, ErrWatchEnded)
			}
			select {
			case t.out <- ev:
			case <-t.stopped:
				return
			}
		}
		select {
		case <-t.stopped:
		default:
			w.failed(informer, ErrWatchEnded)
		}
	}()
	return t
}

func (t *trackedWatch) ResultChan() <-chan watch.Event { return t.out }

func (t *trackedWatch) Stop() {
	t.once.Do(func() { close(t.stopped) })
	t.Interface.Stop()
}
