package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/sysroute"
)

// newCleanupCmd is `tungate cleanup`: by hand, what every start does
// first — remove the routes and rules a killed tungate left behind, by its
// journal (route.journal) and by tungate's tag in its band and table.
func newCleanupCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Remove the routes and rules a killed tungate left behind (without --config: the embedded default configuration)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configs.Load(path, cmd.Flags())
			if err != nil {
				return err
			}
			log := newLogger(cfg.Log)
			rc := routeConfig(cfg, cfg.Tun.Name)
			n, err := sysroute.Cleanup(rc, log)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "tungate cleanup: removed %d rules and routes (route.table %d, rules from priority %d, journal %s)\n",
				n, rc.Table, rc.Priority, rc.Journal)
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file of the tungate to clean up after")
	configs.BindFlags(cmd.Flags())
	return cmd
}
