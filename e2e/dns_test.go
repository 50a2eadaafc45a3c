//go:build linux

package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/internal/netlab"
)

const dnsListen = "172.19.0.2"

// Names the lab's DNS servers know; anything else under test. is NXDOMAIN.
var (
	webAddr4  = netlab.Remote4(7)
	webAddr6  = netlab.Remote6(7)
	realAddr4 = netlab.Remote4(8)
)

// startDnsmasq runs dnsmasq in wan on Remote4(5):53 as the real upstream,
// logging every query it receives.
func startDnsmasq(t *testing.T, lab *netlab.Lab) *netlab.Proc {
	t.Helper()
	bin := netlab.RequireBinary(t, "dnsmasq")
	p := lab.Wan.Start(t, bin,
		"--keep-in-foreground", "--no-daemon", "--no-resolv", "--no-hosts",
		"--log-queries", "--log-facility=-", "--pid-file=",
		"--user=root", "--group=root",
		"--listen-address="+netlab.Remote4(5).String(), "--bind-interfaces", "--port=53",
		"--local=/test/", "--local-ttl=300", "--neg-ttl=300",
		fmt.Sprintf("--host-record=web.test,%s,%s", webAddr4, webAddr6),
		fmt.Sprintf("--host-record=burst.test,%s", webAddr4),
		fmt.Sprintf("--host-record=real.test,%s", realAddr4),
	)
	lab.Wan.WaitListen(t, "udp", netlab.Remote4(5).String()+":53", 5*time.Second)
	return p
}

// upstreamQueries counts the queries for name of type qtype that reached
// dnsmasq, and fails if any came from somewhere other than tungate's
// socket on the app veth.
func upstreamQueries(t *testing.T, p *netlab.Proc, qtype, name string) int {
	t.Helper()
	n := 0
	for _, line := range strings.Split(p.Log(), "\n") {
		i := strings.Index(line, "query[")
		if i < 0 {
			continue
		}
		if !strings.HasSuffix(line, " from "+netlab.AppAddr4.String()) {
			t.Errorf("dnsmasq got a query not from tungate's upstream socket: %s", line)
		}
		if strings.Contains(line, "query["+qtype+"] "+name+" ") {
			n++
		}
	}
	return n
}

func dnsConfig(mode string, upstreams ...string) map[string]any {
	cfg := baseConfig()
	cfg["dns"] = map[string]any{
		"enabled":   true,
		"mode":      mode,
		"listen":    dnsListen,
		"hijack":    []string{"any:53"},
		"upstreams": upstreams,
	}
	return cfg
}

// query asks server (host:port) from the app namespace over network.
func query(t testing.TB, lab *netlab.Lab, network, server, name string, qtype uint16) *dns.Msg {
	t.Helper()
	c, err := lab.App.DialTimeout(network, server, 3*time.Second)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, server, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	conn := &dns.Conn{Conn: c}
	if err := conn.WriteMsg(m); err != nil {
		t.Fatalf("query %s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	r, err := conn.ReadMsg()
	if err != nil {
		t.Fatalf("answer to %s %s over %s from %s: %v", name, dns.TypeToString[qtype], network, server, err)
	}
	if r.Id != m.Id {
		t.Fatalf("answer id %d, query id %d", r.Id, m.Id)
	}
	return r
}

func answerAddrs(r *dns.Msg) []netip.Addr {
	var out []netip.Addr
	for _, rr := range r.Answer {
		switch v := rr.(type) {
		case *dns.A:
			a, _ := netip.AddrFromSlice(v.A.To4())
			out = append(out, a)
		case *dns.AAAA:
			a, _ := netip.AddrFromSlice(v.AAAA)
			out = append(out, a)
		}
	}
	return out
}

func wantAddrs(t testing.TB, what string, r *dns.Msg, want ...netip.Addr) {
	t.Helper()
	got := answerAddrs(r)
	if r.Rcode != dns.RcodeSuccess || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s: rcode %s, addresses %v; want NOERROR %v", what, dns.RcodeToString[r.Rcode], got, want)
	}
}

// decoyDNS listens where the app sends queries in the wan: if tungate
// leaked a query instead of answering it, the decoy would see it.
func decoyDNS(t *testing.T, lab *netlab.Lab, addr string) func() int {
	t.Helper()
	pc, err := lab.Wan.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := lab.Wan.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	hits := 0
	var wg sync.WaitGroup
	t.Cleanup(func() { pc.Close(); ln.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			mu.Lock()
			hits++
			mu.Unlock()
		}
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			hits++
			mu.Unlock()
			c.Close()
		}
	})
	return func() int { mu.Lock(); defer mu.Unlock(); return hits }
}

func TestDNSRealMode(t *testing.T) {
	lab := netlab.New(t)
	dnsmasq := startDnsmasq(t, lab)
	decoy := decoyDNS(t, lab, netlab.Remote4(6).String()+":53")
	g := startGateway(t, lab, dnsConfig("real", "udp://"+netlab.Remote4(5).String()+":53"))

	// Hijack: whatever server the app asks, over UDP or TCP, tungate
	// answers, and nothing reaches the address the app asked.
	wantAddrs(t, "UDP to a wan address", query(t, lab, "udp", netlab.Remote4(6).String()+":53", "web.test", dns.TypeA), webAddr4)
	wantAddrs(t, "UDP to an unassigned address", query(t, lab, "udp", "10.233.1.200:53", "web.test", dns.TypeA), webAddr4)
	wantAddrs(t, "TCP to dns.listen", query(t, lab, "tcp", dnsListen+":53", "web.test", dns.TypeA), webAddr4)
	wantAddrs(t, "TCP to a wan address", query(t, lab, "tcp", netlab.Remote4(6).String()+":53", "web.test", dns.TypeAAAA), webAddr6)
	if n := decoy(); n != 0 {
		t.Errorf("the server the app addressed got %d queries: tungate leaked them", n)
	}
	// Cache: the repeats above (within the TTL) reached dnsmasq once.
	if n := upstreamQueries(t, dnsmasq, "A", "web.test"); n != 1 {
		t.Errorf("dnsmasq got %d A queries for web.test, want 1 (the rest from the cache)", n)
	}

	// Negative caching.
	for range 3 {
		r := query(t, lab, "udp", dnsListen+":53", "nope.test", dns.TypeA)
		if r.Rcode != dns.RcodeNameError {
			t.Fatalf("nope.test: %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
		}
	}
	if n := upstreamQueries(t, dnsmasq, "A", "nope.test"); n != 1 {
		t.Errorf("dnsmasq got %d queries for nope.test, want 1 (NXDOMAIN cached)", n)
	}

	// In-flight de-duplication: 50 identical questions at once.
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			wantAddrs(t, "concurrent burst.test", query(t, lab, "udp", dnsListen+":53", "burst.test", dns.TypeA), webAddr4)
		})
	}
	wg.Wait()
	if n := upstreamQueries(t, dnsmasq, "A", "burst.test"); n != 1 {
		t.Errorf("50 concurrent queries for burst.test made %d upstream queries, want 1", n)
	}
	if v := g.metric("tungate_dns_cache_hits_total"); v < 3 {
		t.Errorf("tungate_dns_cache_hits_total = %v, want ≥ 3", v)
	}
}

// appResolvConf points the app namespace's resolver (ip netns exec bind
// mounts /etc/netns/NAME/resolv.conf) at dns.listen.
func appResolvConf(t *testing.T, lab *netlab.Lab) {
	t.Helper()
	dir := filepath.Join("/etc/netns", lab.App.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver "+dnsListen+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// webServer serves "hello from web.test" on addr in wan.
func webServer(t *testing.T, lab *netlab.Lab, addr string) {
	t.Helper()
	ln, err := lab.Wan.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello from web.test")
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

func TestDNSFakeIP(t *testing.T) {
	curl := netlab.RequireBinary(t, "curl")
	lab := netlab.New(t)
	dnsmasq := startDnsmasq(t, lab)
	webServer(t, lab, netip.AddrPortFrom(webAddr4, 8080).String())
	appResolvConf(t, lab)
	cfg := dnsConfig("fake-ip", "udp://"+netlab.Remote4(5).String()+":53")
	store := filepath.Join(t.TempDir(), "fakeip.store")
	cfg["dns"].(map[string]any)["fake_ip"] = map[string]any{
		"range4":  "198.18.0.0/15",
		"range6":  "fc00::/18",
		"store":   store,
		"exclude": []string{"real.test"},
	}
	g := startGateway(t, lab, cfg)

	r := query(t, lab, "udp", dnsListen+":53", "web.test", dns.TypeA)
	addrs := answerAddrs(r)
	if len(addrs) != 1 || !netip.MustParsePrefix("198.18.0.0/15").Contains(addrs[0]) {
		t.Fatalf("fake-ip A for web.test: %v, want one address in 198.18.0.0/15", addrs)
	}
	fake := addrs[0]
	r6 := answerAddrs(query(t, lab, "udp", dnsListen+":53", "web.test", dns.TypeAAAA))
	if len(r6) != 1 || !netip.MustParsePrefix("fc00::/18").Contains(r6[0]) {
		t.Fatalf("fake-ip AAAA for web.test: %v, want one address in fc00::/18", r6)
	}
	wantAddrs(t, "excluded real.test", query(t, lab, "udp", dnsListen+":53", "real.test", dns.TypeA), realAddr4)
	if n := upstreamQueries(t, dnsmasq, "A", "web.test"); n != 0 {
		t.Errorf("fake-ip answered web.test from the pool, yet dnsmasq got %d A queries for it", n)
	}

	// curl resolves through the namespace's resolv.conf, gets the fake
	// address, connects to it; tungate maps it back to web.test and the
	// direct outbound dials the real server.
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	out, err := lab.App.Run(ctx, curl, "-4", "-sS", "--max-time", "10", "http://web.test:8080/")
	if err != nil || string(out) != "hello from web.test" {
		t.Fatalf("curl http://web.test:8080/: %q, %v", out, err)
	}
	if !strings.Contains(g.proc.Log(), "domain=web.test") {
		t.Errorf("tungate's log never routed a flow with domain=web.test")
	}

	// SIGKILL, then a new tungate on the same store: the fake address
	// still leads to web.test, without asking DNS again.
	if err := g.proc.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if exited, _ := g.proc.Wait(5 * time.Second); !exited {
		t.Fatal("tungate survived SIGKILL")
	}
	lab.App.WaitLinkGone(t, tunName, 5*time.Second)
	startGateway(t, lab, cfg)
	c := dialApp(t, lab, netip.AddrPortFrom(fake, 8080).String())
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: web.test\r\n\r\n")
	body, _ := io.ReadAll(c)
	if !strings.HasSuffix(string(body), "hello from web.test") {
		t.Fatalf("after SIGKILL and restart, %s:8080 answered %q; want web.test's page", fake, body)
	}
}

// testCA makes a CA and a server certificate for ip, written as PEM files
// in dir: ca.pem, cert.pem, key.pem.
func testCA(t *testing.T, dir string, ip netip.Addr) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tungate test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: ip.String()},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{ip.AsSlice()}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	write := func(name, typ string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca.pem", "CERTIFICATE", caDER)
	write("cert.pem", "CERTIFICATE", der)
	write("key.pem", "EC PRIVATE KEY", keyDER)
}

// startUnbound serves DoT (853) and DoH (443) on Remote4(9) with a
// certificate from a test CA in dir.
func startUnbound(t *testing.T, lab *netlab.Lab, dir string) {
	t.Helper()
	bin := netlab.RequireBinary(t, "unbound")
	ip := netlab.Remote4(9)
	conf := fmt.Sprintf(`server:
  interface: %[1]s@853
  interface: %[1]s@443
  tls-port: 853
  https-port: 443
  tls-service-key: %[2]q
  tls-service-pem: %[3]q
  do-daemonize: no
  username: ""
  chroot: ""
  directory: %[4]q
  pidfile: ""
  use-syslog: no
  logfile: ""
  log-queries: yes
  access-control: 0.0.0.0/0 allow
  do-ip6: no
  local-zone: "test." static
  local-data: "web.test. 60 IN A %[5]s"
  module-config: "iterator"
remote-control:
  control-enable: no
`, ip, filepath.Join(dir, "key.pem"), filepath.Join(dir, "cert.pem"), dir, webAddr4)
	path := filepath.Join(dir, "unbound.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	lab.Wan.Start(t, bin, "-d", "-c", path)
	lab.Wan.WaitListen(t, "tcp", ip.String()+":853", 10*time.Second)
	lab.Wan.WaitListen(t, "tcp", ip.String()+":443", 10*time.Second)
}

func TestDNSEncryptedUpstreams(t *testing.T) {
	lab := netlab.New(t)
	dir := t.TempDir()
	testCA(t, dir, netlab.Remote4(9))
	startUnbound(t, lab, dir)
	other := t.TempDir()
	testCA(t, other, netlab.Remote4(9)) // a CA the server's certificate is not from

	for _, up := range []string{"tls://" + netlab.Remote4(9).String() + ":853", "https://" + netlab.Remote4(9).String() + "/dns-query"} {
		t.Run(strings.SplitN(up, ":", 2)[0], func(t *testing.T) {
			// Go's TLS on Linux trusts SSL_CERT_FILE: the test CA.
			t.Setenv("SSL_CERT_FILE", filepath.Join(dir, "ca.pem"))
			g := startGateway(t, lab, dnsConfig("real", up))
			wantAddrs(t, "web.test via "+up, query(t, lab, "udp", dnsListen+":53", "web.test", dns.TypeA), webAddr4)
			g.stop()
			lab.App.WaitLinkGone(t, tunName, 5*time.Second)

			t.Setenv("SSL_CERT_FILE", filepath.Join(other, "ca.pem"))
			g = startGateway(t, lab, dnsConfig("real", up))
			r := query(t, lab, "udp", dnsListen+":53", "web.test", dns.TypeA)
			if r.Rcode != dns.RcodeServerFailure {
				t.Fatalf("with an untrusted certificate: %s %v; want SERVFAIL", dns.RcodeToString[r.Rcode], answerAddrs(r))
			}
			if log := g.proc.Log(); !strings.Contains(log, "certificate") {
				t.Fatalf("tungate's log does not say the certificate was refused:\n%s", log)
			}
			g.stop()
			lab.App.WaitLinkGone(t, tunName, 5*time.Second)
		})
	}
}

// TestDNSDeadUpstreamFailsOver: the first upstream is a closed port on a
// wan host, which answers ICMP port unreachable. The app's query is
// answered by the second (dnsmasq) at once, not after the 3 s attempt
// timeout, and tungate's log says at WARN which upstream failed and why.
func TestDNSDeadUpstreamFailsOver(t *testing.T) {
	lab := netlab.New(t)
	dnsmasq := startDnsmasq(t, lab)
	dead := "udp://" + netlab.Remote4(5).String() + ":5353"
	g := startGateway(t, lab, dnsConfig("real", dead, "udp://"+netlab.Remote4(5).String()+":53"))

	start := time.Now()
	r := query(t, lab, "udp", dnsListen+":53", "web.test", dns.TypeA)
	took := time.Since(start)
	wantAddrs(t, "web.test past a dead first upstream", r, webAddr4)
	t.Logf("answered in %v past the dead upstream", took)
	if took >= time.Second {
		t.Errorf("the answer took %v, want < 1s: the refusal should fail over at once", took)
	}
	line := g.waitLogLine(5*time.Second, slog.LevelWarn, "dns upstream failed", slog.String("upstream", dead), slog.String("cause", "refused"))
	if !strings.Contains(line, "connection refused") {
		t.Errorf("WARN line %q, want the cause's error in it", line)
	}
	if n := upstreamQueries(t, dnsmasq, "A", "web.test"); n != 1 {
		t.Errorf("dnsmasq got %d A queries for web.test, want 1", n)
	}
}

// TestDNSThroughHTTPProxyAsksOverTCP: with dns.outbound an HTTP proxy
// (TCP only), the udp:// upstream is asked over TCP through the proxy, and
// tungate says so at start.
func TestDNSThroughHTTPProxyAsksOverTCP(t *testing.T) {
	lab := netlab.New(t)
	startDnsmasq(t, lab)
	tp := startTinyproxy(t, lab)
	up := "udp://" + netlab.Remote4(5).String() + ":53"
	cfg := dnsConfig("real", up)
	cfg["outbounds"] = []any{map[string]any{"name": "web", "type": "http", "address": tinyproxyAddr.String()}, directOutbound()}
	cfg["final"] = "direct"
	cfg["dns"].(map[string]any)["outbound"] = "web"
	g := startGateway(t, lab, cfg)
	g.waitLogLine(5*time.Second, slog.LevelInfo, "dns outbound carries no UDP: asking udp:// upstreams over TCP", slog.String("outbound", "web"))

	wantAddrs(t, "web.test through the HTTP proxy", query(t, lab, "udp", dnsListen+":53", "web.test", dns.TypeA), webAddr4)
	if !strings.Contains(tp.Log(), netlab.Remote4(5).String()) {
		t.Errorf("tinyproxy's log shows no CONNECT to %s:\n%s", netlab.Remote4(5), tp.Log())
	}
}
