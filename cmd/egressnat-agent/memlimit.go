package main

import (
	"fmt"
	"math"
	"runtime/debug"
	"strconv"
)

// memoryLimitPercent is the share of the container's memory limit the Go
// runtime keeps its memory under (its soft limit, as GOMEMLIMIT sets it).
// Without a limit the heap grows to twice what is live before each
// collection (GOGC=100): at 20,000 pods the agent keeps 60-80 MiB live and
// its heap peaked near 150 MiB. At 60% of the manifest's 256 MiB (153 MiB)
// the runtime collects sooner only as the heap nears that; measured at
// 20,000 pods (TestAgentMemory) the agent's VmHWM went from 175-176 MiB to
// 165-167 MiB at the same CPU time. Raising limits.memory raises this limit
// with it, so the runtime never works hard for a limit the container
// does not have.
const memoryLimitPercent = 60

// setMemoryLimit sets the runtime's soft memory limit to
// memoryLimitPercent of MEMORY_LIMIT (the container's limits.memory in
// bytes, from the downward API) unless GOMEMLIMIT is set, which the
// runtime honours by itself. It returns the limit in effect, 0 for none.
func setMemoryLimit(getenv func(string) string) (int64, error) {
	current := func() int64 {
		if l := debug.SetMemoryLimit(-1); l != math.MaxInt64 {
			return l
		}
		return 0
	}
	v := getenv("MEMORY_LIMIT")
	if getenv("GOMEMLIMIT") != "" || v == "" {
		return current(), nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("MEMORY_LIMIT %q: want the container's memory limit in bytes", v)
	}
	limit := n / 100 * memoryLimitPercent
	debug.SetMemoryLimit(limit)
	return limit, nil
}
