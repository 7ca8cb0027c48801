package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

// histogram is a Prometheus histogram as scraped: cumulative counts by
// upper bound (le), sorted by bound, +Inf last.
type histogram struct {
	le    []float64
	count []float64
}

var bucketLine = regexp.MustCompile(`^(\w+)_bucket\{le="([^"]+)"\} ([0-9.e+-]+)$`)

// agentHistogram scrapes one histogram from the agent of node.
func (s *scale) agentHistogram(ctx context.Context, node, name string) (histogram, error) {
	ns := s.c.Lab.Node(node).NetNS
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return lab.DialTCP(ctx, ns, addr)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", cluster.AgentHealthPort), nil)
	if err != nil {
		return histogram{}, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return histogram{}, fmt.Errorf("scrape agent %s: %w", node, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return histogram{}, err
	}
	var h histogram
	for _, line := range strings.Split(string(body), "\n") {
		m := bucketLine.FindStringSubmatch(line)
		if m == nil || m[1] != name {
			continue
		}
		le, err1 := strconv.ParseFloat(m[2], 64)
		n, err2 := strconv.ParseFloat(m[3], 64)
		if err1 != nil || err2 != nil {
			return histogram{}, fmt.Errorf("agent %s: bad line %q", node, line)
		}
		h.le = append(h.le, le)
		h.count = append(h.count, n)
	}
	if len(h.le) == 0 {
		return histogram{}, fmt.Errorf("agent %s serves no %s", node, name)
	}
	return h, nil
}

// minus returns the observations of h made since before (same buckets).
func (h histogram) minus(before histogram) histogram {
	out := histogram{le: slices.Clone(h.le), count: slices.Clone(h.count)}
	if slices.Equal(h.le, before.le) {
		for i := range out.count {
			out.count[i] -= before.count[i]
		}
	}
	return out
}

func (h histogram) plus(o histogram) histogram {
	if len(h.le) == 0 {
		return o
	}
	out := histogram{le: slices.Clone(h.le), count: slices.Clone(h.count)}
	for i := range out.count {
		out.count[i] += o.count[i]
	}
	return out
}

// quantileBound returns the upper bound of the bucket holding quantile q.
func (h histogram) quantileBound(q float64) float64 {
	total := h.count[len(h.count)-1]
	for i, c := range h.count {
		if c >= q*total {
			return h.le[i]
		}
	}
	return h.le[len(h.le)-1]
}

// within returns the share of observations at most bound (a bucket bound).
func (h histogram) within(bound float64) float64 {
	total := h.count[len(h.count)-1]
	if total == 0 {
		return 0
	}
	for i, le := range h.le {
		if le == bound {
			return h.count[i] / total
		}
	}
	return 0
}

// agentProgramming scrapes the agents' pod programming histograms, summed.
func (s *scale) agentProgramming(ctx context.Context) (histogram, error) {
	var sum histogram
	for _, n := range s.nodes {
		h, err := s.agentHistogram(ctx, n, "egressnat_agent_pod_programming_seconds")
		if err != nil {
			return histogram{}, err
		}
		sum = sum.plus(h)
	}
	return sum, nil
}
