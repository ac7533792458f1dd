package xendom

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// The guest's suspend: asked over xenstore as xl does, awaited on
// xenstored's @releaseDomain watch.

// DomainWatcher is a Store that says when a domain's state changes
// (*xenstore.Client: xenstored's @releaseDomain watch). Pause waits on it
// for the guest's suspend instead of polling the hypervisor every 2 ms.
type DomainWatcher interface {
	WatchDomains(ctx context.Context) (changed <-chan struct{}, stop func(), err error)
}

func (s *Source) controlPath() string {
	return "/local/domain/" + strconv.FormatUint(uint64(s.opt.Dom), 10) + "/control/shutdown"
}

// Pause implements engine.Source: the guest is asked to suspend, as xl
// does, and the domain stops once the guest has quiesced its devices and
// made its suspend hypercall. Post-copy cannot stop the guest behind its
// back: its event channels, grant table and vCPU info registrations live
// in the hypervisor and are rebuilt by the guest's resume path only.
func (s *Source) Pause() error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Without a watch, poll every 2 ms (each poll is a hypercall); with
	// one, look when it fires, and every 20 ms in case xenstored does not
	// fire it for this domain (it fires @releaseDomain once per shutdown).
	var changed <-chan struct{}
	poll := 2 * time.Millisecond
	if w, ok := s.opt.XS.(DomainWatcher); ok {
		ch, stop, err := w.WatchDomains(ctx)
		if err == nil {
			defer stop()
			changed, poll = ch, 20*time.Millisecond
		} else {
			s.opt.Logf("watch @releaseDomain (polling for the suspend instead): %v", err)
		}
	}
	// The watch is set before the request, so the suspend cannot slip
	// between them.
	if err := s.opt.XS.Write(ctx, s.controlPath(), "suspend"); err != nil {
		return fmt.Errorf("ask the guest to suspend (write %s): %w", s.controlPath(), err)
	}
	deadline := start.Add(s.opt.SuspendTimeout)
	tick := time.NewTimer(poll)
	defer tick.Stop()
	byWatch := false // the watch fired for the suspend
	for {
		info, err := s.opt.HV.Domain(s.opt.Dom)
		if err != nil {
			return fmt.Errorf("wait for the guest to suspend: %w", err)
		}
		if info.Shutdown {
			if info.ShutdownReason != xenctrl.ShutdownSuspend {
				return fmt.Errorf("the guest shut down with reason %d instead of suspending", info.ShutdownReason)
			}
			// A poll that came just before the watch fired: it fired too.
			select {
			case <-changed:
				byWatch = true
			default:
			}
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest did not suspend within %v (does its kernel run the xenbus control driver?)", s.opt.SuspendTimeout)
		}
		select {
		case <-changed:
			byWatch = true
		case <-tick.C:
			byWatch = false
		}
		tick.Reset(poll)
	}
	s.mu.Lock()
	s.suspended = true
	s.stats.SuspendMs = float64(time.Since(start).Microseconds()) / 1000
	s.stats.SuspendWatched = byWatch
	s.mu.Unlock()
	s.opt.Logf("guest suspended in %v", time.Since(start).Round(time.Millisecond))
	return nil
}
