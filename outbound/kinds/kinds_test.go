package kinds

import (
	"slices"
	"testing"

	"github.com/tungate/tungate/outbound"
)

func TestEveryKindRegistered(t *testing.T) {
	if got, want := outbound.Types(), []string{"direct", "http", "reject", "socks5"}; !slices.Equal(got, want) {
		t.Errorf("Types() = %v, want %v", got, want)
	}
}
