package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/tungate/tungate/api"
	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/gateway"
)

// newLogger returns the process logger, the level a reload or the API may
// change, and the hub that copies records to the API's /logs streams.
func newLogger(cfg configs.Log) (*slog.Logger, *slog.LevelVar, *api.LogHub) {
	level := new(slog.LevelVar)
	setLevel(level, cfg.Level)
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if cfg.Format == "json" {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	hub := api.NewLogHub(h)
	return slog.New(hub), level, hub
}

func setLevel(v *slog.LevelVar, name string) {
	var level slog.Level
	_ = level.UnmarshalText([]byte(name)) // configs validated it
	v.Set(level)
}

// run runs the gateway until SIGINT, SIGTERM or SIGQUIT, each of which
// undoes what it changed on the host; SIGHUP reloads the
// configuration file at path (the embedded default has none to re-read).
func run(ctx context.Context, cfg *configs.Config, path string, flags *pflag.FlagSet) error {
	log, level, hub := newLogger(cfg.Log)
	deps := gateway.Deps{Log: log, Logs: hub, Level: level, Version: version}
	if path != "" {
		deps.Load = func() (*configs.Config, error) { return configs.Load(path, flags) }
	}
	g, err := gateway.New(cfg, deps)
	if err != nil {
		return err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	// SIGHUP is taken before Start, so a closed terminal during start-up
	// cannot kill tungate with its routes installed.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	defer stop()
	if err := g.Start(); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			log.Info("shutting down")
			g.Close()
			log.Info("stopped")
			return nil
		case <-hup:
			if path == "" {
				log.Warn("SIGHUP: nothing to reload: running on the embedded default configuration (no --config)")
				continue
			}
			log.Info("SIGHUP: reloading", "config", path)
			_ = g.Reload(deps.Load) // the gateway logs what it refuses
		}
	}
}
