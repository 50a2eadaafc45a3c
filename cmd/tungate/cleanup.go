package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/gateway"
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
			log, _, _ := newLogger(cfg.Log)
			n, restored, err := gateway.Cleanup(cfg, log)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "tungate cleanup: removed %d rules, routes and nft tables (route.table %d, rules from priority %d, journal %s); restored %d resolver settings\n",
				n, cfg.Route.Table, cfg.Route.Priority, cfg.Route.Journal, restored)
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file of the tungate to clean up after")
	configs.BindFlags(cmd.Flags())
	return cmd
}
