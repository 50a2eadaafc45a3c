// Command tungate is a userspace tunnel gateway: it reads the traffic the
// kernel routes into a TUN device, terminates every TCP and UDP flow in a
// gVisor netstack and relays each one to the upstream its rules pick.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/tungate/tungate/configs"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	if err := newRootCmd().Execute(); err != nil {
		var ve *configs.ValidationError
		if errors.As(err, &ve) {
			for _, fe := range ve.Errors {
				fmt.Fprintln(os.Stderr, fe.Error())
			}
		} else {
			fmt.Fprintln(os.Stderr, "tungate:", err)
		}
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "tungate",
		Short:         "Userspace tunnel gateway: TUN → gVisor netstack → direct, proxy or reject",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newRunCmd(), newCheckCmd(), newCleanupCmd(), newDoctorCmd(), newStatusCmd(), newVersionCmd())
	return root
}

func newRunCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the gateway (without --config: the embedded default configuration)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configs.Load(path, cmd.Flags())
			if err != nil {
				return err
			}
			return run(cmd.Context(), cfg, path, cmd.Flags())
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file")
	configs.BindFlags(cmd.Flags())
	return cmd
}

func newCheckCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Validate a configuration (without --config: the embedded default) and print every error with its key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Like run: environment and flags override the file, or the
			// embedded default without one.
			if _, err := configs.Load(path, cmd.Flags()); err != nil {
				return err
			}
			what := path
			if what == "" {
				what = "embedded default configuration (with TUNGATE_* environment overrides)"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: ok\n", what)
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file (without it: the embedded default)")
	configs.BindFlags(cmd.Flags())
	return cmd
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), "tungate", version)
		},
	}
}
