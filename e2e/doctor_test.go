//go:build linux

package e2e

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// TestDoctor runs `tungate doctor` in the app namespace next to a running
// tungate (route.auto): healthy, it finds no problem and explains one
// destination per rule and outbound; with someone else's rule in tungate's
// band and the TUN down, it exits non-zero and names both, each with a
// fix. Doctor itself changes nothing.
// runDoctor runs `tungate doctor --config path args...` in the app
// namespace and checks that it changed nothing there.
func runDoctor(t *testing.T, lab *netlab.Lab, path string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	before := routingState(t, lab.App)
	out, err := lab.App.Run(ctx, tungateBin, append([]string{"doctor", "--config", path}, args...)...)
	if after := routingState(t, lab.App); after != before {
		t.Errorf("tungate doctor changed the routing state:\n%s\nwas:\n%s", after, before)
	}
	return string(out), err
}

func TestDoctor(t *testing.T) {
	lab := hostLab(t)
	cfg := autoConfig(t)
	cfg["outbounds"] = []any{
		map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark},
		map[string]any{"name": "block", "type": "reject"},
		map[string]any{"name": "proxy", "type": "socks5", "address": netlab.WanAddr4.String() + ":1080"},
	}
	cfg["rules"] = []any{
		map[string]any{"ip_cidr": []string{netlab.Remote4(3).String() + "/32"}, "outbound": "block"},
		map[string]any{"ip_cidr": []string{"10.233.1.0/24"}, "port": []int{443}, "network": "tcp", "outbound": "direct"},
	}
	cfg["final"] = "proxy"
	routeKeys(cfg)["exclude_addresses"] = []string{netlab.Remote4(9).String() + "/32"}
	path := writeYAML(t, cfg)
	g := startAuto(t, lab, cfg)

	doctor := func(args ...string) (string, error) { return runDoctor(t, lab, path, args...) }

	t.Run("healthy", func(t *testing.T) {
		dests := []string{
			remote4(3, 443) + "/tcp", // rules[0]: reject
			remote4(4, 443) + "/tcp", // rules[1]: direct
			remote4(5, 80) + "/tcp",  // final: the socks5 proxy
			remote4(9, 80) + "/tcp",  // route.exclude_addresses: never enters the TUN
			remote6(4, 443) + "/tcp", // IPv6: final
		}
		var args []string
		for _, d := range dests {
			args = append(args, "--explain", d)
		}
		out, err := doctor(args...)
		if err != nil {
			t.Fatalf("tungate doctor with a healthy tungate: %v", err)
		}
		for _, want := range []string{
			"ok: tun: tg0 exists and is up",
			"ipv4 9000: from all fwmark 0x2e7 goto 9004 proto tungate",
			"ipv6 9003: from all nop proto tungate",
			"ipv4 default dev tg0 table 2022 proto tungate",
			"ok: default interface: detected ipv4 veth0",
			"no problems found",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("doctor output lacks %q:\n%s", want, out)
			}
		}
		explained := map[string]string{}
		for _, part := range strings.Split(out, "\nexplain ")[1:] {
			dest, _, _ := strings.Cut(part, "\n")
			explained[dest] = part
		}
		intoTUN := "table 2022 dev tg0 src 172.19.0.1 → into tungate's TUN (tungate's table)"
		for dest, wants := range map[string][]string{
			dests[0]: {intoTUN, `tungate: rules[0] (ip_cidr 10.233.1.3/32) → outbound "block"`, "upstream: none: a reject outbound"},
			dests[1]: {intoTUN, `tungate: rules[1] (ip_cidr 10.233.1.0/24, port 443, network tcp) → outbound "direct"`,
				"kernel, tungate's direct socket to 10.233.1.4:443 (fwmark 0x2e7): table main via 10.233.0.2 dev veth0"},
			dests[2]: {intoTUN, `tungate: no rule matches → final outbound "proxy"`,
				"kernel, tungate's socket to the socks5 proxy 10.233.0.2:1080 (fwmark 0x2e7): table main dev veth0"},
			dests[3]: {"table main via 10.233.0.2 dev veth0 src 10.233.0.1 → bypasses tungate", "tungate never sees this flow"},
			dests[4]: {"table 2022 dev tg0 src fdfe:dcba:9876::1 → into tungate's TUN (tungate's table)", `tungate: no rule matches → final outbound "proxy"`},
		} {
			got, ok := explained[dest]
			if !ok {
				t.Errorf("doctor did not explain %s:\n%s", dest, out)
				continue
			}
			for _, want := range wants {
				if !strings.Contains(got, want) {
					t.Errorf("explain %s lacks %q:\n%s", dest, want, got)
				}
			}
		}
	})

	t.Run("broken", func(t *testing.T) {
		// Someone else's rule in tungate's band, and the TUN down.
		lab.App.MustRun(t, "ip", "rule", "add", "priority", "9001", "lookup", "100")
		lab.App.MustRun(t, "ip", "link", "set", tunName, "down")
		out, err := doctor()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Fatalf("tungate doctor with problems: %v, want exit status 1\n%s", err, out)
		}
		for _, want := range []string{
			"PROBLEM: tun: tg0 exists but is down",
			"PROBLEM: ip rules: ipv4 rule \"9001: from all lookup 100",
			"ip -4 rule del priority 9001 from all lookup 100",
			"PROBLEM: routes: table 2022 lacks tungate's ipv4 default dev tg0",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("doctor output lacks %q:\n%s", want, out)
			}
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "PROBLEM:") && !strings.Contains(line, " — fix: ") {
				t.Errorf("a problem without a fix: %s", line)
			}
		}
		if !strings.Contains(out, "problem(s) found") {
			t.Errorf("doctor does not sum up the problems:\n%s", out)
		}
	})
	g.stop()
}

// TestDoctorRPFilter checks doctor's rp_filter advice against the kernel:
// with route.include_uids and strict reverse path filtering, replies to a
// selected app are dropped (the reverse lookup, as uid 0, skips tungate's
// band), doctor says so, and the fix it prints makes them arrive.
func TestDoctorRPFilter(t *testing.T) {
	curl := netlab.RequireBinary(t, "curl")
	setpriv := netlab.RequireBinary(t, "setpriv")
	lab := hostLab(t)
	web := remote4(1, 8080)
	webServer(t, lab, web)
	const uid = "4242"
	cfg := autoConfig(t)
	routeKeys(cfg)["include_uids"] = []string{uid}
	path := writeYAML(t, cfg)
	sysctl := func(kv ...string) {
		t.Helper()
		lab.App.MustRun(t, "sysctl", append([]string{"-qw"}, kv...)...) // the app namespace's own
	}
	sysctl("net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.default.rp_filter=0")
	g := startAuto(t, lab, cfg)
	get := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := lab.App.Run(ctx, setpriv, "--reuid="+uid, "--regid="+uid, "--clear-groups",
			curl, "-sS", "--max-time", "3", "http://"+web+"/")
		return err
	}
	flows := g.metric("tungate_tcp_flows_total")

	if err := get(); err != nil {
		t.Fatalf("loose rp_filter: curl as uid %s: %v", uid, err)
	}
	g.wantFlows(flows+1, "the selected uid goes through the TUN")
	if out, err := runDoctor(t, lab, path); err != nil || !strings.Contains(out, "ok: rp_filter:") {
		t.Fatalf("doctor with loose rp_filter: %v\n%s", err, out)
	}

	sysctl("net.ipv4.conf.all.rp_filter=1")
	if err := get(); err == nil {
		t.Fatal("strict rp_filter: curl as the selected uid worked; doctor's explanation would be wrong")
	}
	out, err := runDoctor(t, lab, path)
	if err == nil || !strings.Contains(out, "PROBLEM: rp_filter:") || !strings.Contains(out, "route.include_uids") {
		t.Fatalf("doctor with strict rp_filter and include_uids: %v, want a PROBLEM naming rp_filter and route.include_uids\n%s", err, out)
	}
	// Apply the fix it prints.
	line := out[strings.Index(out, "PROBLEM: rp_filter:"):]
	line, _, _ = strings.Cut(line, "\n")
	_, fix, _ := strings.Cut(line, "sysctl -w ")
	fix, _, _ = strings.Cut(fix, " (")
	sysctl(strings.Fields(fix)...)
	if err := get(); err != nil {
		t.Fatalf("after doctor's fix (sysctl -w %s): curl as uid %s: %v", fix, uid, err)
	}
	if out, err := runDoctor(t, lab, path); err != nil {
		t.Fatalf("doctor after its fix: %v\n%s", err, out)
	}
	g.stop()
}
