package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/sysdns"
	"github.com/tungate/tungate/sysroute"
)

// newCleanupCmd is `tungate cleanup`: by hand, what every start does
// first — restore the system resolver and remove the routes, rules and nft
// table a killed tungate left behind, by its journals (route.journal) and
// by tungate's tag in its band and table.
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
			restored, err := sysdns.Restore(sysdns.JournalPath(cfg.Route.Journal), log)
			if err != nil {
				return err
			}
			rc := routeConfig(cfg, cfg.Tun.Name)
			n, err := sysroute.Cleanup(rc, log)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "tungate cleanup: removed %d rules, routes and nft tables (route.table %d, rules from priority %d, journal %s); restored %d resolver settings\n",
				n, rc.Table, rc.Priority, rc.Journal, restored)
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file of the tungate to clean up after")
	configs.BindFlags(cmd.Flags())
	return cmd
}
