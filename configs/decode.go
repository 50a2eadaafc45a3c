package configs

import (
	"fmt"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// The decode hooks below convert the values YAML, environment variables and
// flags produce into the field types of Config. Each one acts only when the
// target type is its own and passes everything else through unchanged, so
// their order in the composition does not matter beyond scalarToSliceHook
// coming first. Their errors become the message of a FieldError whose key
// mapstructure supplies, so they describe the value, not where it is.

var (
	prefixType    = reflect.TypeFor[netip.Prefix]()
	addrType      = reflect.TypeFor[netip.Addr]()
	durationType  = reflect.TypeFor[time.Duration]()
	portRangeType = reflect.TypeFor[PortRange]()
	uidRangeType  = reflect.TypeFor[UIDRange]()
)

// scalarToSliceHook lets a list key take a single value (`port: 443`) and an
// environment variable give a list as "a,b,c".
func scalarToSliceHook(_, to reflect.Type, data any) (any, error) {
	if to.Kind() != reflect.Slice || data == nil {
		return data, nil
	}
	switch v := data.(type) {
	case []any:
		return data, nil
	case map[string]any:
		return nil, fmt.Errorf("expected a list, got a map")
	case string:
		out := []any{}
		for part := range strings.SplitSeq(v, ",") {
			if part = strings.TrimSpace(part); part != "" {
				out = append(out, part)
			}
		}
		return out, nil
	default:
		return []any{data}, nil
	}
}

// sectionHook rejects a scalar or list where a section of keys belongs,
// with a message that says so rather than mapstructure's type names.
func sectionHook(_, to reflect.Type, data any) (any, error) {
	if !isSection(to) {
		return data, nil
	}
	if _, ok := data.(map[string]any); !ok {
		return nil, fmt.Errorf("expected a map of keys, got %s", describe(data))
	}
	return data, nil
}

func prefixHook(_, to reflect.Type, data any) (any, error) {
	if to != prefixType {
		return data, nil
	}
	s, ok := data.(string)
	if !ok {
		return nil, fmt.Errorf("expected a CIDR such as \"10.0.0.0/8\", got %s", describe(data))
	}
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("invalid CIDR %q: %s", s, netipReason(err))
	}
	return p, nil
}

func addrHook(_, to reflect.Type, data any) (any, error) {
	if to != addrType {
		return data, nil
	}
	s, ok := data.(string)
	if !ok {
		return nil, fmt.Errorf("expected an IP address, got %s", describe(data))
	}
	if s = strings.TrimSpace(s); s == "" {
		return netip.Addr{}, nil // unset; validation decides whether that is allowed
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return nil, fmt.Errorf("invalid IP address %q: %s", s, netipReason(err))
	}
	return a, nil
}

// netipReason strips netip's `netip.ParsePrefix("…"): ` prefix, which would
// repeat the value the message already quotes.
func netipReason(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "): "); i >= 0 {
		return msg[i+3:]
	}
	return msg
}

// durationHook accepts Go durations ("10s", "5m") and a bare 0. Any other
// bare number is an error: `dial_timeout: 10` is almost certainly not ten
// nanoseconds.
func durationHook(_, to reflect.Type, data any) (any, error) {
	if to != durationType {
		return data, nil
	}
	switch v := data.(type) {
	case string:
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("invalid duration %q (examples: \"10s\", \"5m\", \"1h30m\")", v)
		}
		return d, nil
	case time.Duration:
		return v, nil
	}
	if n, ok := asInt64(data); ok {
		if n == 0 {
			return time.Duration(0), nil
		}
		return nil, fmt.Errorf("duration %d has no unit (write e.g. \"%ds\")", n, n)
	}
	return nil, fmt.Errorf("expected a duration such as \"10s\", got %s", describe(data))
}

func portRangeHook(_, to reflect.Type, data any) (any, error) {
	if to != portRangeType {
		return data, nil
	}
	from, upTo, err := parseRange(data, 1, 65535)
	if err != nil {
		return nil, fmt.Errorf("invalid port range: %w", err)
	}
	return PortRange{From: uint16(from), To: uint16(upTo)}, nil
}

func uidRangeHook(_, to reflect.Type, data any) (any, error) {
	if to != uidRangeType {
		return data, nil
	}
	from, upTo, err := parseRange(data, 0, 1<<32-1)
	if err != nil {
		return nil, fmt.Errorf("invalid uid range: %w", err)
	}
	return UIDRange{From: uint32(from), To: uint32(upTo)}, nil
}

// parseRange reads 443, "443" or "8000-8999" and checks both ends lie in
// [lo, hi] and are in order.
func parseRange(data any, lo, hi uint64) (from, upTo uint64, err error) {
	if n, ok := asInt64(data); ok {
		if n < 0 || uint64(n) < lo || uint64(n) > hi {
			return 0, 0, fmt.Errorf("%d is outside %d-%d", n, lo, hi)
		}
		return uint64(n), uint64(n), nil
	}
	s, ok := data.(string)
	if !ok {
		return 0, 0, fmt.Errorf("expected a number or \"from-to\", got %s", describe(data))
	}
	first, last, isRange := strings.Cut(strings.TrimSpace(s), "-")
	from, err = strconv.ParseUint(strings.TrimSpace(first), 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("%q is not a number or \"from-to\"", s)
	}
	upTo = from
	if isRange {
		if upTo, err = strconv.ParseUint(strings.TrimSpace(last), 10, 64); err != nil {
			return 0, 0, fmt.Errorf("%q is not a number or \"from-to\"", s)
		}
	}
	if from < lo || from > hi || upTo < lo || upTo > hi {
		return 0, 0, fmt.Errorf("%q is outside %d-%d", s, lo, hi)
	}
	if from > upTo {
		return 0, 0, fmt.Errorf("%q starts after it ends", s)
	}
	return from, upTo, nil
}

// integerHook converts to every integer field type with a range check.
// Strings (from the environment, or quoted in YAML) may be decimal or
// 0x-prefixed hex, so `fwmark: "0x2e7"` works like YAML's own 0x2e7; a
// leading zero is decimal, not octal.
func integerHook(_, to reflect.Type, data any) (any, error) {
	if to == durationType {
		return data, nil
	}
	signed := false
	switch to.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		signed = true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
	default:
		return data, nil
	}
	out := reflect.New(to).Elem()

	if s, ok := data.(string); ok {
		s = strings.TrimSpace(s)
		base := 10
		digits := strings.TrimLeft(s, "+-")
		if strings.HasPrefix(digits, "0x") || strings.HasPrefix(digits, "0X") {
			base = 0
		}
		if signed {
			n, err := strconv.ParseInt(s, base, to.Bits())
			if err != nil {
				return nil, integerError(s, to, err)
			}
			out.SetInt(n)
		} else {
			n, err := strconv.ParseUint(s, base, to.Bits())
			if err != nil {
				return nil, integerError(s, to, err)
			}
			out.SetUint(n)
		}
		return out.Interface(), nil
	}

	rv := reflect.ValueOf(data)
	switch {
	case data == nil:
		return data, nil
	case rv.CanInt():
		n := rv.Int()
		if !signed && n < 0 {
			return nil, fmt.Errorf("%d is negative (%s)", n, integerRange(to))
		}
		if signed && out.OverflowInt(n) || !signed && out.OverflowUint(uint64(n)) {
			return nil, fmt.Errorf("%d is out of range (%s)", n, integerRange(to))
		}
		if signed {
			out.SetInt(n)
		} else {
			out.SetUint(uint64(n))
		}
	case rv.CanUint():
		n := rv.Uint()
		if signed && (n > 1<<63-1 || out.OverflowInt(int64(n))) || !signed && out.OverflowUint(n) {
			return nil, fmt.Errorf("%d is out of range (%s)", n, integerRange(to))
		}
		if signed {
			out.SetInt(int64(n))
		} else {
			out.SetUint(n)
		}
	case rv.CanFloat():
		f := rv.Float()
		if f != float64(int64(f)) {
			return nil, fmt.Errorf("expected a whole number, got %v", f)
		}
		return integerHook(nil, to, int64(f))
	default:
		return nil, fmt.Errorf("expected a number, got %s", describe(data))
	}
	return out.Interface(), nil
}

func integerError(s string, to reflect.Type, err error) error {
	if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
		return fmt.Errorf("%s is out of range (%s)", s, integerRange(to))
	}
	return fmt.Errorf("invalid number %q", s)
}

// integerRange describes the values an integer type holds, e.g. "0 to 4294967295".
func integerRange(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return fmt.Sprintf("0 to %d", uint64(1)<<t.Bits()-1)
	}
	return fmt.Sprintf("%d to %d", -(int64(1) << (t.Bits() - 1)), int64(1)<<(t.Bits()-1)-1)
}

func boolHook(_, to reflect.Type, data any) (any, error) {
	if to.Kind() != reflect.Bool || data == nil {
		return data, nil
	}
	switch v := data.(type) {
	case bool:
		return v, nil
	case string:
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("invalid boolean %q (write true or false)", v)
		}
		return b, nil
	}
	return nil, fmt.Errorf("expected true or false, got %s", describe(data))
}

// stringHook accepts numbers for string keys, so an unquoted `password:
// 1234` works, but not lists, maps or booleans, which are mistakes.
func stringHook(_, to reflect.Type, data any) (any, error) {
	if to.Kind() != reflect.String || data == nil {
		return data, nil
	}
	if s, ok := data.(string); ok {
		return s, nil
	}
	rv := reflect.ValueOf(data)
	if rv.CanInt() || rv.CanUint() || rv.CanFloat() {
		return fmt.Sprint(data), nil
	}
	return nil, fmt.Errorf("expected a string, got %s", describe(data))
}

// asInt64 returns data as an int64 if it is an integer of any Go type.
func asInt64(data any) (int64, bool) {
	rv := reflect.ValueOf(data)
	switch {
	case data == nil:
		return 0, false
	case rv.CanInt():
		return rv.Int(), true
	case rv.CanUint() && rv.Uint() <= 1<<63-1:
		return int64(rv.Uint()), true
	}
	return 0, false
}

// describe names the kind of a decoded YAML value for error messages.
func describe(data any) string {
	switch v := data.(type) {
	case nil:
		return "nothing"
	case string:
		return fmt.Sprintf("the string %q", v)
	case bool:
		return fmt.Sprintf("the boolean %v", v)
	case []any:
		return "a list"
	case map[string]any:
		return "a map"
	}
	rv := reflect.ValueOf(data)
	switch {
	case rv.CanInt(), rv.CanUint(), rv.CanFloat():
		return fmt.Sprintf("the number %v", data)
	case rv.Kind() == reflect.Slice:
		return "a list"
	case rv.Kind() == reflect.Map:
		return "a map"
	}
	return fmt.Sprintf("a %T", data)
}
