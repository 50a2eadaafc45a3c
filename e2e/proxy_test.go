//go:build linux

package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// The SOCKS5 and HTTP proxies listen on the wan end of the veth, which
// tungate's marked sockets reach directly.
var (
	dantedAddr     = netip.AddrPortFrom(netlab.WanAddr4, 1080)
	microsocksAddr = netip.AddrPortFrom(netlab.WanAddr4, 1081)
	tinyproxyAddr  = netip.AddrPortFrom(netlab.WanAddr4, 8888)
)

const (
	proxyUser = "tgproxy"
	proxyPass = "s3cret-pass"
)

// proxyUserAccount makes the system account danted authenticates (RFC 1929
// username/password through PAM/passwd) and removes it afterwards.
func proxyUserAccount(t *testing.T) {
	t.Helper()
	if _, err := exec.Command("id", proxyUser).CombinedOutput(); err != nil {
		if out, err := exec.Command("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", proxyUser).CombinedOutput(); err != nil {
			t.Fatalf("useradd %s: %v\n%s", proxyUser, err, out)
		}
		t.Cleanup(func() { exec.Command("userdel", proxyUser).Run() })
	}
	cmd := exec.Command("chpasswd")
	cmd.Stdin = strings.NewReader(proxyUser + ":" + proxyPass + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("chpasswd: %v\n%s", err, out)
	}
}

func startDanted(t *testing.T, lab *netlab.Lab, dir string) *netlab.Proc {
	t.Helper()
	bin := netlab.RequireBinary(t, "danted")
	// debug: 1 makes danted log each request as received (ATYP, name).
	conf := fmt.Sprintf(`logoutput: stderr
debug: 1
internal: %s port = %d
external: %s
# The remote hosts are on this namespace's lo; picking the external
# address by route fails for them.
external.rotation: none
# Dante connects its UDP socket to the first destination by default, which
# only lets that destination reply; full cone needs it unconnected.
udp.connectdst: no
socksmethod: username
user.privileged: root
user.unprivileged: root
client pass {
  from: 0.0.0.0/0 to: 0.0.0.0/0
}
socks pass {
  from: 0.0.0.0/0 to: 0.0.0.0/0
  command: connect udpassociate udpreply
  log: connect disconnect error
}
`, dantedAddr.Addr(), dantedAddr.Port(), dantedAddr.Addr())
	path := filepath.Join(dir, "danted.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	p := lab.Wan.Start(t, bin, "-f", path)
	lab.Wan.WaitListen(t, "tcp", dantedAddr.String(), 10*time.Second)
	return p
}

func proxyConfig(outbounds []any, rules []any, final string) map[string]any {
	cfg := baseConfig()
	cfg["outbounds"] = outbounds
	cfg["rules"] = rules
	cfg["final"] = final
	return cfg
}

func directOutbound() map[string]any {
	return map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark}
}

func dantedOutbound(name, password string) map[string]any {
	return map[string]any{"name": name, "type": "socks5", "address": dantedAddr.String(), "username": proxyUser, "password": password, "udp": true}
}

// bulkBothWays moves 64 MiB up and 64 MiB down through addr and checks the
// hashes.
func bulkBothWays(t *testing.T, lab *netlab.Lab, addr string, seed uint64) {
	t.Helper()
	want, _ := hashOf(stream(seed))
	up := dialApp(t, lab, addr)
	defer up.Close()
	up.SetDeadline(time.Now().Add(2 * time.Minute))
	hdr := []byte{'L', 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint64(hdr[1:], bulkSize)
	up.Write(hdr)
	if _, err := io.Copy(up, stream(seed)); err != nil {
		t.Fatalf("upload through %s: %v", addr, err)
	}
	var got [32]byte
	if _, err := io.ReadFull(up, got[:]); err != nil || got != want {
		t.Fatalf("upload: server hashed %x (%v), sent %x", got, err, want)
	}
	down := dialApp(t, lab, addr)
	defer down.Close()
	down.SetDeadline(time.Now().Add(2 * time.Minute))
	down.Write([]byte{'D'})
	if sum, n := hashOf(down); n != bulkSize || sum != want {
		t.Fatalf("download: %d bytes hashing %x, want %d hashing %x", n, sum, bulkSize, want)
	}
}

func TestSOCKS5Danted(t *testing.T) {
	lab := netlab.New(t)
	proxyUserAccount(t)
	danted := startDanted(t, lab, t.TempDir())
	const seed = 0x50c5
	bulkServer(t, lab.Wan, remote4(1, 5001), seed)
	lab.Wan.TCPEcho(t, remote4(2, 7))
	g := startGateway(t, lab, proxyConfig(
		[]any{dantedOutbound("proxy", proxyPass), dantedOutbound("badauth", "wrong"), directOutbound()},
		[]any{
			map[string]any{"ip_cidr": []string{netlab.Remote4(3).String() + "/32"}, "outbound": "badauth"},
			map[string]any{"ip_cidr": []string{netlab.Remote4(2).String() + "/32"}, "outbound": "direct"},
		},
		"proxy"))

	t.Run("tcp 64 MiB both ways", func(t *testing.T) {
		bulkBothWays(t, lab, remote4(1, 5001), seed)
		if !strings.Contains(danted.Log(), netlab.Remote4(1).String()+".5001") {
			t.Fatalf("danted's log shows no connection to %s:5001: the flows did not go through it\n%s", netlab.Remote4(1), danted.Log())
		}
	})

	t.Run("udp associate, full cone", func(t *testing.T) {
		server := netip.AddrPortFrom(netlab.Remote4(1), 7)
		senders := recordingUDPServer(t, lab.Wan, server.String())
		app := listenApp(t, lab, "udp4")
		if _, err := app.WriteToUDPAddrPort([]byte("ping"), server); err != nil {
			t.Fatal(err)
		}
		got, from, err := readFrom(app, 5*time.Second)
		if err != nil || string(got) != "ping" || from != server {
			t.Fatalf("udp echo through danted: %q from %s (%v)", got, from, err)
		}
		relay := <-senders
		second := netip.AddrPortFrom(netlab.Remote4(2), 9999)
		other, err := lab.Wan.ListenPacket("udp", second.String())
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		other.(*net.UDPConn).WriteToUDPAddrPort([]byte("from elsewhere"), relay)
		got, from, err = readFrom(app, 5*time.Second)
		if err != nil || string(got) != "from elsewhere" || from != second {
			t.Fatalf("datagram from a second remote via danted's relay %s: %q from %s (%v); want %q from %s", relay, got, from, err, "from elsewhere", second)
		}
	})

	t.Run("wrong credentials", func(t *testing.T) {
		start := time.Now()
		_, err := lab.App.DialTimeout("tcp", remote4(3, 5001), 5*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
			t.Fatalf("dial through the outbound with a wrong password: %v after %v; want ECONNREFUSED within 1 s", err, time.Since(start))
		}
		waitLog(t, g.proc, "outbound=badauth", 2*time.Second)
		waitLog(t, g.proc, "tcp dial failed", 2*time.Second)
		for _, line := range strings.Split(g.proc.Log(), "\n") {
			if strings.Contains(line, "tcp dial failed") && (!strings.Contains(line, "outbound=badauth") || !strings.Contains(line, "authentication failed")) {
				t.Errorf("the failure's log line does not name the outbound and the reason: %s", line)
			}
		}
		c := dialApp(t, lab, remote4(1, 5001)) // the right credentials still work
		c.Close()
		if v := g.metric(`tungate_outbound_proxy_refused_total{outbound="badauth"}`); v != 1 {
			t.Errorf(`tungate_outbound_proxy_refused_total{outbound="badauth"} = %v, want 1`, v)
		}
	})

	t.Run("proxy dies and comes back", func(t *testing.T) {
		// An upload under way when the proxy dies: the app must see a
		// reset, not a write that silently goes nowhere.
		c := dialApp(t, lab, remote4(1, 5001))
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		hdr := []byte{'L', 0, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint64(hdr[1:], 1<<40)
		c.Write(hdr)
		chunk := make([]byte, 64<<10)
		for range 16 {
			if _, err := c.Write(chunk); err != nil {
				t.Fatalf("upload before the kill: %v", err)
			}
		}
		danted.Signal(syscall.SIGKILL)
		danted.Wait(5 * time.Second)
		var err error
		for err == nil {
			_, err = c.Write(chunk)
		}
		// Linux reports the first write after a RST as ECONNRESET and
		// later ones as EPIPE.
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("upload after its proxy died: %v; want a reset", err)
		}
		start := time.Now()
		_, err = lab.App.DialTimeout("tcp", remote4(1, 5001), 5*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
			t.Fatalf("new flow while the proxy is down: %v after %v; want ECONNREFUSED within 1 s", err, time.Since(start))
		}
		echoOnce(t, lab, []byte("other outbounds keep working"))

		danted = startDanted(t, lab, t.TempDir())
		c2 := dialApp(t, lab, remote4(1, 5001))
		c2.SetDeadline(time.Now().Add(30 * time.Second))
		c2.Write([]byte{'D'})
		if _, err := io.ReadFull(c2, make([]byte, 1<<20)); err != nil {
			t.Fatalf("flow after the proxy came back: %v", err)
		}
		c2.Close()
	})
}

// TestSOCKS5DomainToProxy: with fake-ip, a flow to a name routed to the
// SOCKS5 outbound reaches the server, and the proxy is given the name.
func TestSOCKS5DomainToProxy(t *testing.T) {
	curl := netlab.RequireBinary(t, "curl")
	lab := netlab.New(t)
	proxyUserAccount(t)
	// danted resolves the name itself, from the wan namespace's own hosts
	// file (ip netns exec mounts /etc/netns/NAME/hosts).
	hostsDir := filepath.Join("/etc/netns", lab.Wan.Name)
	os.MkdirAll(hostsDir, 0o755)
	t.Cleanup(func() { os.RemoveAll(hostsDir) })
	os.WriteFile(filepath.Join(hostsDir, "hosts"), []byte(webAddr4.String()+" web.test\n"), 0o644)
	danted := startDanted(t, lab, t.TempDir())
	startDnsmasq(t, lab)
	webServer(t, lab, netip.AddrPortFrom(webAddr4, 8080).String())
	appResolvConf(t, lab)

	cfg := dnsConfig("fake-ip", "udp://"+netlab.Remote4(5).String()+":53")
	cfg["outbounds"] = []any{directOutbound(), dantedOutbound("proxy", proxyPass)}
	cfg["rules"] = []any{map[string]any{"domain_suffix": []string{"web.test"}, "outbound": "proxy"}}
	startGateway(t, lab, cfg)

	out, err := lab.App.Run(t.Context(), curl, "-4", "-sS", "--max-time", "10", "http://web.test:8080/")
	if err != nil || string(out) != "hello from web.test" {
		t.Fatalf("curl http://web.test:8080/ through the proxy: %q, %v", out, err)
	}
	if !strings.Contains(danted.Log(), "ATYP: 3 address: web.test.8080") {
		t.Fatalf("danted's log does not show the name web.test:\n%s", danted.Log())
	}
}

func TestSOCKS5Microsocks(t *testing.T) {
	bin := netlab.RequireBinary(t, "microsocks")
	lab := netlab.New(t)
	lab.Wan.Start(t, bin, "-i", microsocksAddr.Addr().String(), "-p", fmt.Sprint(microsocksAddr.Port()))
	lab.Wan.WaitListen(t, "tcp", microsocksAddr.String(), 5*time.Second)
	const seed = 0x3005
	bulkServer(t, lab.Wan, remote4(1, 5001), seed)
	g := startGateway(t, lab, proxyConfig(
		[]any{map[string]any{"name": "micro", "type": "socks5", "address": microsocksAddr.String(), "udp": false}, directOutbound()},
		nil, "micro"))
	bulkBothWays(t, lab, remote4(1, 5001), seed)
	if v := g.metric("tungate_tcp_flows_total"); v != 2 {
		t.Errorf("tungate_tcp_flows_total = %v, want 2", v)
	}
}

// startTinyproxy runs tinyproxy in wan on tinyproxyAddr, logging every
// CONNECT.
func startTinyproxy(t *testing.T, lab *netlab.Lab) *netlab.Proc {
	t.Helper()
	bin := netlab.RequireBinary(t, "tinyproxy")
	dir := t.TempDir()
	conf := fmt.Sprintf("User root\nGroup root\nPort %d\nListen %s\nTimeout 60\nLogLevel Connect\nMaxClients 100\nAllow 10.233.0.0/16\nDisableViaHeader Yes\n",
		tinyproxyAddr.Port(), tinyproxyAddr.Addr())
	path := filepath.Join(dir, "tinyproxy.conf")
	os.WriteFile(path, []byte(conf), 0o600)
	tp := lab.Wan.Start(t, bin, "-d", "-c", path)
	lab.Wan.WaitListen(t, "tcp", tinyproxyAddr.String(), 5*time.Second)
	return tp
}

func TestHTTPConnectTinyproxy(t *testing.T) {
	lab := netlab.New(t)
	tp := startTinyproxy(t, lab)
	const seed = 0x4770
	bulkServer(t, lab.Wan, remote4(1, 5001), seed)
	g := startGateway(t, lab, proxyConfig(
		[]any{map[string]any{"name": "web", "type": "http", "address": tinyproxyAddr.String()}, directOutbound()},
		nil, "web"))
	bulkBothWays(t, lab, remote4(1, 5001), seed)
	if !strings.Contains(tp.Log(), netlab.Remote4(1).String()) {
		t.Fatalf("tinyproxy's log shows no CONNECT to %s:\n%s", netlab.Remote4(1), tp.Log())
	}

	// UDP cannot go through HTTP CONNECT: refused at once (ICMP port
	// unreachable, ECONNREFUSED on a connected socket) and counted.
	uc, err := lab.App.Dial("udp", remote4(1, 7))
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	uc.Write([]byte("q"))
	uc.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := uc.Read(make([]byte, 16)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("udp routed to the http outbound: %v; want ECONNREFUSED", err)
	}
	if v := g.metric("tungate_udp_refused_by_outbound_total"); v < 1 {
		t.Errorf("tungate_udp_refused_by_outbound_total = %v, want ≥ 1", v)
	}
}
