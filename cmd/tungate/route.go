package main

import "github.com/tungate/tungate/configs"

// installRoutes sets up the OS routing that sends traffic into the TUN
// (route.auto). Until sysroute exists, it says so plainly.
func (g *gateway) installRoutes(cfg *configs.Config) error {
	if cfg.Route.Auto {
		g.log.Warn("route.auto: auto-route is not available yet; route traffic into the TUN yourself", "tun", g.dev.Name())
	}
	return nil
}

// removeRoutes undoes installRoutes; it is called first on shutdown.
func (g *gateway) removeRoutes() {}
