//go:build linux

package netlab

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// HTTPClient returns a client whose connections are made inside n, without
// keep-alive (a kept-alive connection would hold a goroutine in the server,
// which tests that count goroutines would see).
func (n *NS) HTTPClient() *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return n.DialTimeout(network, addr, 2*time.Second)
			},
		},
	}
}

// WaitHealthy polls http://api/healthz from inside n until it answers,
// failing t after timeout or as soon as p exits.
func (n *NS) WaitHealthy(t testing.TB, p *Proc, api string, timeout time.Duration) {
	t.Helper()
	c := n.HTTPClient()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := c.Get("http://" + api + "/healthz")
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) || p.Exited() {
			t.Fatalf("netlab: API at %s not up: %v\n%s", api, err, p.Log())
		}
		time.Sleep(pollInterval)
	}
}

// Metric scrapes http://api/metrics from inside n and returns the value of
// a metric without labels.
func (n *NS) Metric(api, name string) (float64, error) {
	resp, err := n.HTTPClient().Get("http://" + api + "/metrics")
	if err != nil {
		return 0, fmt.Errorf("scrape %s: %w", api, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				return 0, fmt.Errorf("metric %s: %q: %w", name, sc.Text(), err)
			}
			return v, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("scrape %s: %w", api, err)
	}
	return 0, fmt.Errorf("metric %s not exported", name)
}
