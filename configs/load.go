package configs

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/tungate/tungate/outbound"
)

// envPrefix makes log.level readable from TUNGATE_LOG_LEVEL and
// stack.tcp.dial_timeout from TUNGATE_STACK_TCP_DIAL_TIMEOUT.
const envPrefix = "TUNGATE"

// configFlags are the flags BindFlags registers and Load honours.
var configFlags = []struct{ name, key, usage string }{
	{"log-level", "log.level", "log level: debug, info, warn or error (overrides log.level)"},
	{"log-format", "log.format", "log format: text or json (overrides log.format)"},
}

// BindFlags registers the flags that override configuration keys:
// --log-level (log.level) and --log-format (log.format). Pass the same
// FlagSet to Load; a flag overrides the file and the environment only when
// it was set on the command line. Flags already registered are left alone.
func BindFlags(fs *pflag.FlagSet) {
	for _, f := range configFlags {
		if fs.Lookup(f.name) == nil {
			fs.String(f.name, "", f.usage)
		}
	}
}

// Load reads the YAML file at path ("" = the embedded default), then the
// TUNGATE_<SECTION>_<KEY> environment variables, then the flags of flags
// that BindFlags registered and the command line set (flags may be nil).
// Each later source overrides the earlier ones key by key, and every key
// none of them gives keeps its default. Environment variables reach only
// the section keys of the default file, not list entries; a list value is
// written comma-separated (TUNGATE_TUN_ADDRESS=10.0.0.1/30,fd00::1/126).
//
// A file that cannot be read or is not YAML is a plain error. Unknown keys,
// values that do not decode and values that fail validation are returned
// together as a *ValidationError.
func Load(path string, flags *pflag.FlagSet) (*Config, error) {
	v, err := newViper(path, flags, true)
	if err != nil {
		return nil, err
	}
	cfg, err := decodeAndValidate(v.AllSettings())
	var ve *ValidationError
	if errors.As(err, &ve) {
		nameEnvironmentSources(ve)
	}
	return cfg, err
}

// nameEnvironmentSources adds to each problem whose value came from a
// TUNGATE_* variable that variable's name: the file may be fine, and the
// user must know where to look.
func nameEnvironmentSources(ve *ValidationError) {
	for i, fe := range ve.Errors {
		key, _, _ := strings.Cut(fe.Key, "[")
		name := envPrefix + "_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
		if _, set := os.LookupEnv(name); set {
			ve.Errors[i].Msg += " (from the environment variable " + name + ")"
		}
	}
}

// newViper layers the configuration sources, lowest precedence first.
func newViper(path string, flags *pflag.FlagSet, useEnv bool) (*viper.Viper, error) {
	// Every leaf of the default file becomes a viper default, so a partial
	// file keeps the other defaults and AutomaticEnv knows every key.
	defaults := viper.New()
	defaults.SetConfigType("yaml")
	if err := defaults.ReadConfig(bytes.NewReader(defaultYAML)); err != nil {
		return nil, fmt.Errorf("parse embedded default.yaml: %w", unwrapParseError(err))
	}
	v := viper.New()
	v.SetConfigType("yaml")
	for _, key := range defaults.AllKeys() {
		v.SetDefault(key, defaults.Get(key))
	}

	if path != "" {
		// Read the file ourselves: viper would pick the codec from the file
		// extension, and a config called tungate.conf is still YAML.
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read config: %w", err)
		}
		if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
			return nil, fmt.Errorf("parse config %s: %w", path, unwrapParseError(err))
		}
	}

	if useEnv {
		v.SetEnvPrefix(envPrefix)
		v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
		v.AutomaticEnv()
	}

	if flags != nil {
		for _, f := range configFlags {
			if flag := flags.Lookup(f.name); flag != nil {
				if err := v.BindPFlag(f.key, flag); err != nil {
					return nil, fmt.Errorf("bind flag --%s to %s: %w", f.name, f.key, err)
				}
			}
		}
	}
	return v, nil
}

// unwrapParseError drops viper's "While parsing config:" prefix; the caller
// adds which file it was.
func unwrapParseError(err error) error {
	var pe viper.ConfigParseError
	if errors.As(err, &pe) && pe.Unwrap() != nil {
		return pe.Unwrap()
	}
	return err
}

// decodeAndValidate turns viper's merged settings into a Config and reports
// every unknown key, undecodable value and invalid value.
func decodeAndValidate(settings map[string]any) (*Config, error) {
	// Outbound entries are checked and decoded against their kind's
	// schema by decodeOutbounds, not the generic Outbound one.
	rawOutbounds, hasOutbounds := settings["outbounds"]
	delete(settings, "outbounds")
	problems := unknownKeys("", reflect.TypeFor[Config](), settings)

	cfg := new(Config)
	decodeProblems := decode(settings, cfg)
	if hasOutbounds {
		var unknown, undecodable []FieldError
		cfg.Outbounds, unknown, undecodable = decodeOutbounds(rawOutbounds)
		problems = append(problems, unknown...)
		decodeProblems = append(decodeProblems, undecodable...)
	}
	problems = append(problems, decodeProblems...)

	// A value that failed to decode is left zero; validating it again would
	// report the same key twice with a less useful message. Likewise a
	// problem of a whole list entry ("rules[0]: has no condition") most
	// likely comes from the misspelt or undecodable key inside it.
	reported := problems[:len(problems):len(problems)]
	for _, p := range cfg.validate() {
		if coveredBy(p.Key, decodeProblems) || isEntryOfReportedKey(p.Key, reported) {
			continue
		}
		problems = append(problems, p)
	}
	if len(problems) > 0 {
		return nil, &ValidationError{Errors: problems}
	}
	return cfg, nil
}

// decodeOutbounds decodes the raw outbounds list: name and type, then the
// entry's other keys into its kind's Config, on top of the kind's
// defaults. It returns the unknown keys (checked against the kind's
// schema) apart from the values that did not decode.
func decodeOutbounds(raw any) (out []Outbound, unknown, undecodable []FieldError) {
	list, ok := raw.([]any)
	if !ok {
		if raw == nil {
			return nil, nil, nil
		}
		return nil, nil, []FieldError{{Key: "outbounds", Msg: "expected a list of outbounds, got " + describe(raw)}}
	}
	out = make([]Outbound, len(list))
	for i, item := range list {
		key := fmt.Sprintf("outbounds[%d]", i)
		entry, ok := item.(map[string]any)
		if !ok {
			undecodable = append(undecodable, FieldError{Key: key, Msg: "expected a map of keys, got " + describe(item)})
			continue
		}
		common := map[string]any{}
		rest := map[string]any{}
		for k, v := range entry {
			if k == "name" || k == "type" {
				common[k] = v
			} else {
				rest[k] = v
			}
		}
		undecodable = append(undecodable, prefixed(key, decode(common, &out[i]))...)
		kind, known := outbound.Lookup(out[i].Type)
		if !known {
			continue // validate reports the type; its keys cannot be checked
		}
		settings := kind.NewConfig()
		fields := sectionFields(reflect.TypeOf(settings).Elem())
		names := append([]string{"name", "type"}, fields.names...)
		for _, k := range slices.Sorted(maps.Keys(rest)) {
			ft, known := fields.types[k]
			if !known {
				unknown = append(unknown, FieldError{Key: key + "." + k, Msg: unknownKeyMsg(k, names)})
				continue
			}
			unknown = append(unknown, unknownKeys(key+"."+k, ft, rest[k])...)
		}
		undecodable = append(undecodable, prefixed(key, decode(rest, settings))...)
		out[i].Settings = settings
	}
	return out, unknown, undecodable
}

func prefixed(prefix string, fes []FieldError) []FieldError {
	for i := range fes {
		if fes[i].Key == "(top level)" {
			fes[i].Key = prefix
		} else {
			fes[i].Key = prefix + "." + fes[i].Key
		}
	}
	return fes
}

// decode runs mapstructure over settings and maps each decoding error back
// to the dotted key it concerns.
func decode(settings map[string]any, result any) []FieldError {
	dec, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
		Result:  result,
		TagName: "mapstructure",
		// Conversions are the hooks' job: weak typing would turn a YAML
		// `mtu: true` into 1 and `dial_timeout: 10` into ten nanoseconds.
		WeaklyTypedInput: false,
		DecodeHook: mapstructure.ComposeDecodeHookFunc(
			scalarToSliceHook,
			sectionHook,
			prefixHook,
			addrHook,
			durationHook,
			portRangeHook,
			uidRangeHook,
			integerHook,
			boolHook,
			stringHook,
		),
	})
	if err != nil {
		// Only a malformed DecoderConfig gets here, which is a bug in this file.
		panic("configs: " + err.Error())
	}
	return fieldErrors(dec.Decode(settings))
}

// fieldErrors flattens mapstructure's joined errors into one FieldError per
// failed key.
func fieldErrors(err error) []FieldError {
	if err == nil {
		return nil
	}
	if de, ok := err.(*mapstructure.DecodeError); ok {
		key := de.Name()
		if key == "" {
			key = "(top level)"
		}
		return []FieldError{{Key: key, Msg: de.Unwrap().Error()}}
	}
	switch e := err.(type) {
	case interface{ Unwrap() []error }:
		var out []FieldError
		for _, inner := range e.Unwrap() {
			out = append(out, fieldErrors(inner)...)
		}
		return out
	case interface{ Unwrap() error }:
		return fieldErrors(e.Unwrap())
	}
	// mapstructure names every error it returns; reaching here means a new
	// error shape, still reported rather than dropped.
	return []FieldError{{Key: "(top level)", Msg: err.Error()}}
}

// coveredBy reports whether key is one of the failed keys or lies under one.
func coveredBy(key string, failed []FieldError) bool {
	for _, f := range failed {
		if key == f.Key || strings.HasPrefix(key, f.Key+".") || strings.HasPrefix(key, f.Key+"[") {
			return true
		}
	}
	return false
}

// isEntryOfReportedKey reports whether key is a list entry ("rules[0]")
// holding a key that already has a problem ("rules[0].ipcidr").
func isEntryOfReportedKey(key string, reported []FieldError) bool {
	if !strings.HasSuffix(key, "]") {
		return false
	}
	for _, r := range reported {
		if strings.HasPrefix(r.Key, key+".") {
			return true
		}
	}
	return false
}

// unknownKeys walks data against the schema of t and reports every key that
// no field declares, with the closest known key as a suggestion.
func unknownKeys(path string, t reflect.Type, data any) []FieldError {
	var problems []FieldError
	switch {
	case isSection(t):
		m, ok := data.(map[string]any)
		if !ok {
			return nil // not a map: decode reports the type
		}
		fields := sectionFields(t)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			ft, known := fields.types[k]
			if !known {
				problems = append(problems, FieldError{Key: joinKey(path, k), Msg: unknownKeyMsg(k, fields.names)})
				continue
			}
			problems = append(problems, unknownKeys(joinKey(path, k), ft, m[k])...)
		}
	case t.Kind() == reflect.Slice:
		list, ok := data.([]any)
		if !ok {
			return nil
		}
		for i, item := range list {
			problems = append(problems, unknownKeys(fmt.Sprintf("%s[%d]", path, i), t.Elem(), item)...)
		}
	}
	return problems
}

// isSection reports whether t is a struct of configuration keys, as opposed
// to a value type such as netip.Prefix or PortRange.
func isSection(t reflect.Type) bool {
	return t.Kind() == reflect.Struct && t.NumField() > 0 && t.Field(0).Tag.Get("mapstructure") != ""
}

type schemaFields struct {
	names []string // in declaration order, for stable suggestions
	types map[string]reflect.Type
}

func sectionFields(t reflect.Type) schemaFields {
	f := schemaFields{types: make(map[string]reflect.Type, t.NumField())}
	for i := range t.NumField() {
		name := t.Field(i).Tag.Get("mapstructure")
		if name == "" || name == "-" {
			continue
		}
		f.names = append(f.names, name)
		f.types[name] = t.Field(i).Type
	}
	return f
}

func joinKey(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// unknownKeyMsg suggests the closest known key when it is within two edits
// and the key is not so short that anything would be "close".
func unknownKeyMsg(key string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if d := editDistance(key, k); d < bestDist {
			best, bestDist = k, d
		}
	}
	if best == "" || bestDist >= len(key) {
		return "unknown key"
	}
	return fmt.Sprintf("unknown key (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
