package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tungate/tungate/configs"
)

// newStatusCmd is `tungate status`: a terminal view of a running tungate,
// read from its control API (the Clash-compatible /connections and
// /proxies). It changes nothing.
func newStatusCmd() *cobra.Command {
	var (
		path         string
		once, asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a running tungate's traffic, outbounds and busiest connections (read from its API)",
		Long: `status reads api.listen and api.secret from the configuration (the file
tungate runs with) and asks that tungate's control API for its connections
and outbounds. It prints the traffic totals and rates, the outbounds, and
the 20 busiest connections with the rule and outbound each one took,
refreshing every second until Ctrl-C. With --once it prints one snapshot
(connections ranked by bytes, as there is no second snapshot for rates);
with --json it prints the API's /connections snapshot as JSON. Run it where
the API is reachable (for a loopback api.listen: the same network
namespace). It exits non-zero when the API cannot be asked.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configs.Load(path, nil)
			if err != nil {
				return err
			}
			c, err := newAPIClient(cfg.API)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			out := cmd.OutOrStdout()
			switch {
			case asJSON:
				return printStatusJSON(ctx, out, c)
			case once:
				return printStatusOnce(ctx, out, c)
			}
			return watchStatus(ctx, out, c, isTerminal(out), time.Second)
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file of the running tungate (its api.listen and api.secret; without it: the embedded default, whose API is off)")
	cmd.Flags().BoolVar(&once, "once", false, "print one snapshot and exit")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's /connections snapshot as JSON and exit")
	return cmd
}

// The parts of the Clash API's JSON that status renders. The field names,
// their casing and the string ports are Clash's (the api package serves
// them); everything else in the answers is ignored.

// clashSnapshot is GET /connections.
type clashSnapshot struct {
	DownloadTotal uint64            `json:"downloadTotal"`
	UploadTotal   uint64            `json:"uploadTotal"`
	Connections   []clashConnection `json:"connections"`
}

// clashConnection is one live flow; Upload and Download count bytes since
// it started.
type clashConnection struct {
	ID       string `json:"id"`
	Metadata struct {
		Network         string `json:"network"`
		DestinationIP   string `json:"destinationIP"`
		DestinationPort string `json:"destinationPort"`
		Host            string `json:"host"`
	} `json:"metadata"`
	Upload   uint64 `json:"upload"`
	Download uint64 `json:"download"`
	// Chains names the outbounds the flow went through, the one that
	// dialled first and any group that chose it after it (Clash's order).
	Chains      []string `json:"chains"`
	Rule        string   `json:"rule"`
	RulePayload string   `json:"rulePayload"`
}

// clashProxy is one entry of GET /proxies: an outbound or a selector group.
type clashProxy struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Now  string `json:"now"`
}

// errSecretRefused is what a 401 from the API becomes.
var errSecretRefused = errors.New("the API refused the secret (api.secret)")

// apiClient asks a running tungate's control API.
type apiClient struct {
	addr   string // host:port to connect to
	secret string
	http   *http.Client
}

// apiTimeout bounds one request, the answer's body included.
const apiTimeout = 5 * time.Second

func newAPIClient(a configs.API) (*apiClient, error) {
	if a.Listen == "" {
		return nil, errors.New("the control API is off: set api.listen in the config")
	}
	addr, err := apiDialAddr(a.Listen)
	if err != nil {
		return nil, err
	}
	return &apiClient{addr: addr, secret: a.Secret, http: &http.Client{Timeout: apiTimeout}}, nil
}

// apiDialAddr is where to reach an API listening on listen: a wildcard
// host (":9090", "0.0.0.0:9090", "[::]:9090") is reached on loopback.
func apiDialAddr(listen string) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("api.listen %q: %w", listen, err)
	}
	if port == "0" {
		return "", fmt.Errorf("api.listen %q: port 0 is picked when tungate starts, so status cannot know it; set a fixed port", listen)
	}
	if host == "" {
		host = "127.0.0.1"
	} else if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		if ip.Is4() {
			host = "127.0.0.1"
		} else {
			host = "::1"
		}
	}
	return net.JoinHostPort(host, port), nil
}

// get returns the body of a 200 answer to GET path.
func (c *apiClient) get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.addr+path, nil)
	if err != nil {
		return nil, err
	}
	if c.secret != "" {
		req.Header.Set("Authorization", "Bearer "+c.secret)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // drop `Get "http://…":`, the message names the address
		}
		return nil, fmt.Errorf("cannot reach tungate's API at %s: %w (is tungate running with api.listen set?)", c.addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	switch {
	case resp.StatusCode == http.StatusUnauthorized:
		return nil, errSecretRefused
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("tungate's API at %s: GET %s: %s%s", c.addr, path, resp.Status, apiMessage(body))
	case err != nil:
		return nil, fmt.Errorf("tungate's API at %s: GET %s: reading the answer: %w", c.addr, path, err)
	}
	return body, nil
}

// apiMessage is the {"message": …} of an error answer, as ": message".
func apiMessage(body []byte) string {
	var m struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(body, &m) != nil || m.Message == "" {
		return ""
	}
	return ": " + m.Message
}

func (c *apiClient) getJSON(ctx context.Context, path string, v any) error {
	body, err := c.get(ctx, path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("tungate's API at %s: GET %s: unexpected answer: %w", c.addr, path, err)
	}
	return nil
}

// statusSample is a /connections snapshot and when it arrived.
type statusSample struct {
	snap clashSnapshot
	at   time.Time
}

// fetch takes one snapshot of the connections and the outbounds.
func (c *apiClient) fetch(ctx context.Context) (statusSample, map[string]clashProxy, error) {
	var s statusSample
	if err := c.getJSON(ctx, "/connections", &s.snap); err != nil {
		return s, nil, err
	}
	s.at = time.Now()
	var p struct {
		Proxies map[string]clashProxy `json:"proxies"`
	}
	if err := c.getJSON(ctx, "/proxies", &p); err != nil {
		return s, nil, err
	}
	return s, p.Proxies, nil
}

// printStatusJSON prints the /connections snapshot as the API sent it,
// indented, after checking that it is one.
func printStatusJSON(ctx context.Context, w io.Writer, c *apiClient) error {
	body, err := c.get(ctx, "/connections")
	if err != nil {
		return err
	}
	var snap clashSnapshot
	if err := json.Unmarshal(body, &snap); err != nil {
		return fmt.Errorf("tungate's API at %s: GET /connections: unexpected answer: %w", c.addr, err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, bytes.TrimSpace(body), "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}

func printStatusOnce(ctx context.Context, w io.Writer, c *apiClient) error {
	cur, proxies, err := c.fetch(ctx)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	renderStatus(&out, nil, cur, proxies)
	_, err = w.Write(out.Bytes())
	return err
}

// clearScreen moves the cursor home and clears the terminal.
const clearScreen = "\x1b[H\x1b[2J"

// watchStatus prints a frame every interval until ctx ends, each with the
// rates since the one before. On a terminal each frame replaces the last;
// otherwise frames follow each other, a blank line apart.
func watchStatus(ctx context.Context, w io.Writer, c *apiClient, tty bool, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	var prev *statusSample
	for n := 0; ; n++ {
		cur, proxies, err := c.fetch(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil // Ctrl-C
			}
			return err
		}
		// One write per frame, so that a terminal never shows half of one.
		var out bytes.Buffer
		if tty {
			out.WriteString(clearScreen)
		} else if n > 0 {
			out.WriteByte('\n')
		}
		renderStatus(&out, prev, cur, proxies)
		if _, err := w.Write(out.Bytes()); err != nil {
			return err
		}
		prev = &cur
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// isTerminal reports whether w is a character device, as a terminal is.
// (So is /dev/null, where the screen clearing does no harm.)
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// statusTop is how many connections a frame lists.
const statusTop = 20

// connRow is a connection as a frame shows it.
type connRow struct {
	c              *clashConnection
	upRate, dnRate float64 // bytes/s since the previous frame
}

// renderStatus writes one frame: totals, outbounds and the busiest
// connections. With prev (the frame before), it shows rates and ranks the
// connections by them; without, it ranks them by bytes.
func renderStatus(w io.Writer, prev *statusSample, cur statusSample, proxies map[string]clashProxy) {
	s := cur.snap
	var dt float64
	if prev != nil {
		dt = cur.at.Sub(prev.at).Seconds()
	}
	live := prev != nil && dt > 0

	if live {
		fmt.Fprintf(w, "up %s/s down %s/s  ", iecBytes(rate(s.UploadTotal, prev.snap.UploadTotal, dt)), iecBytes(rate(s.DownloadTotal, prev.snap.DownloadTotal, dt)))
	}
	fmt.Fprintf(w, "total up %s down %s  connections %d\n", iecBytes(float64(s.UploadTotal)), iecBytes(float64(s.DownloadTotal)), len(s.Connections))

	fmt.Fprintln(w, "\noutbounds")
	names := make([]string, 0, len(proxies))
	for name := range proxies {
		names = append(names, name)
	}
	// The outbounds by name, the selector groups after them.
	slices.SortFunc(names, func(a, b string) int {
		ga, gb := proxies[a].Now != "", proxies[b].Now != ""
		if ga != gb {
			if ga {
				return 1
			}
			return -1
		}
		return strings.Compare(a, b)
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, name := range names {
		p := proxies[name]
		if p.Now != "" {
			fmt.Fprintf(tw, "  %s\t%s, now %s\n", name, p.Type, p.Now)
		} else {
			fmt.Fprintf(tw, "  %s\t%s\n", name, p.Type)
		}
	}
	tw.Flush()

	rows := make([]connRow, len(s.Connections))
	var before map[string]*clashConnection
	if live {
		before = make(map[string]*clashConnection, len(prev.snap.Connections))
		for i := range prev.snap.Connections {
			before[prev.snap.Connections[i].ID] = &prev.snap.Connections[i]
		}
	}
	for i := range s.Connections {
		c := &s.Connections[i]
		rows[i].c = c
		if live {
			var up0, dn0 uint64 // a connection new since the last frame started from 0
			if b := before[c.ID]; b != nil {
				up0, dn0 = b.Upload, b.Download
			}
			rows[i].upRate, rows[i].dnRate = rate(c.Upload, up0, dt), rate(c.Download, dn0, dt)
		}
	}
	slices.SortFunc(rows, func(a, b connRow) int {
		if d := cmpDesc(a.upRate+a.dnRate, b.upRate+b.dnRate); d != 0 {
			return d
		}
		if d := cmpDesc(float64(a.c.Upload+a.c.Download), float64(b.c.Upload+b.c.Download)); d != 0 {
			return d
		}
		return strings.Compare(a.c.ID, b.c.ID)
	})

	if len(rows) == 0 {
		fmt.Fprintln(w, "\nno connections")
		return
	}
	by := "bytes"
	if live {
		by = "rate"
	}
	if len(rows) > statusTop {
		fmt.Fprintf(w, "\nconnections: the %d busiest of %d, by %s\n", statusTop, len(rows), by)
		rows = rows[:statusTop]
	} else {
		fmt.Fprintf(w, "\nconnections, busiest first (by %s)\n", by)
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if live {
		fmt.Fprintln(tw, "  NET\tDESTINATION\tRULE\tOUTBOUND\tUP/S\tDOWN/S\tUP\tDOWN")
	} else {
		fmt.Fprintln(tw, "  NET\tDESTINATION\tRULE\tOUTBOUND\tUP\tDOWN")
	}
	for _, r := range rows {
		c := r.c
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t", c.Metadata.Network, connDestination(c), connRule(c), connChain(c))
		if live {
			fmt.Fprintf(tw, "%s\t%s\t", iecBytes(r.upRate), iecBytes(r.dnRate))
		}
		fmt.Fprintf(tw, "%s\t%s\n", iecBytes(float64(c.Upload)), iecBytes(float64(c.Download)))
	}
	tw.Flush()
}

// rate is bytes per second from counter value was to now over dt seconds;
// a counter that went back (tungate restarted) gives 0.
func rate(now, was uint64, dt float64) float64 {
	if now < was || dt <= 0 {
		return 0
	}
	return float64(now-was) / dt
}

func cmpDesc(a, b float64) int {
	switch {
	case a > b:
		return -1
	case a < b:
		return 1
	}
	return 0
}

// connDestination is host:port with the address when the name is known,
// else address:port.
func connDestination(c *clashConnection) string {
	m := c.Metadata
	addr := net.JoinHostPort(m.DestinationIP, m.DestinationPort)
	if m.Host == "" || m.Host == m.DestinationIP {
		return addr
	}
	return net.JoinHostPort(m.Host, m.DestinationPort) + " (" + m.DestinationIP + ")"
}

// connRule is the rule that matched, with its conditions.
func connRule(c *clashConnection) string {
	if c.RulePayload == "" {
		return c.Rule
	}
	p := c.RulePayload
	if r := []rune(p); len(r) > 40 {
		p = string(r[:39]) + "…"
	}
	return c.Rule + " (" + p + ")"
}

// connChain is the outbound chain from the group that chose to the
// outbound that dialled (Clash lists it the other way round).
func connChain(c *clashConnection) string {
	if len(c.Chains) == 0 {
		return "-"
	}
	chain := slices.Clone(c.Chains)
	slices.Reverse(chain)
	return strings.Join(chain, " → ")
}

// iecBytes renders a byte count (or rate) in IEC units: 512 B, 1.5 KiB,
// 35.0 MiB.
func iecBytes(n float64) string {
	if n < 1023.5 {
		return fmt.Sprintf("%.0f B", n)
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v, i := n/1024, 0
	for v >= 1023.95 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}
