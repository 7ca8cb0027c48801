package main

import (
	"math"
	"runtime/debug"
	"testing"
)

func TestSetMemoryLimit(t *testing.T) {
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	env := func(kv map[string]string) func(string) string { return func(k string) string { return kv[k] } }

	got, err := setMemoryLimit(env(map[string]string{"MEMORY_LIMIT": "268435456"})) // 256Mi
	if want := int64(268435456 / 100 * 60); err != nil || got != want || debug.SetMemoryLimit(-1) != want {
		t.Errorf("256Mi container: limit %d (%v), runtime %d; want %d", got, err, debug.SetMemoryLimit(-1), want)
	}
	// GOMEMLIMIT wins: the runtime read it at start (here: as it is now).
	debug.SetMemoryLimit(100 << 20)
	if got, err := setMemoryLimit(env(map[string]string{"MEMORY_LIMIT": "268435456", "GOMEMLIMIT": "100MiB"})); err != nil || got != 100<<20 {
		t.Errorf("with GOMEMLIMIT: %d (%v), want %d", got, err, 100<<20)
	}
	debug.SetMemoryLimit(math.MaxInt64)
	if got, err := setMemoryLimit(env(nil)); err != nil || got != 0 {
		t.Errorf("no limit: %d (%v), want 0", got, err)
	}
	for _, bad := range []string{"256Mi", "-1", "0"} {
		if _, err := setMemoryLimit(env(map[string]string{"MEMORY_LIMIT": bad})); err == nil {
			t.Errorf("MEMORY_LIMIT %q accepted", bad)
		}
	}
}
