package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/gateway"
)

// newLogger returns the process logger and the level a reload may change.
func newLogger(cfg configs.Log) (*slog.Logger, *slog.LevelVar) {
	level := new(slog.LevelVar)
	setLevel(level, cfg.Level)
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), level
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts)), level
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
	log, level := newLogger(cfg.Log)
	g, err := gateway.New(cfg, log)
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
			var next *configs.Config
			err := g.Reload(func() (c *configs.Config, err error) {
				next, err = configs.Load(path, flags)
				return next, err
			})
			if err == nil {
				setLevel(level, next.Log.Level) // the gateway logged what it refused
			}
		}
	}
}
