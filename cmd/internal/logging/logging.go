// Package logging sets up the one zap logger every egressnat binary uses:
// JSON by default, console text with --log-format=console, level by
// --log-level. Keys are stable across the project: node, ip, policy, gateway.
// RouteKlog sends client-go's klog output through the same logger.
package logging

import (
	"flag"
	"fmt"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/klog/v2"
)

// Stable log keys.
const (
	KeyNode    = "node"
	KeyIP      = "ip"
	KeyPolicy  = "policy"
	KeyGateway = "gateway"
)

// Options are the logging flags.
type Options struct {
	Format string
	Level  string
}

// AddFlags registers --log-format and --log-level on fs.
func AddFlags(fs *flag.FlagSet) *Options {
	o := &Options{}
	fs.StringVar(&o.Format, "log-format", "json", "log format: json or console")
	fs.StringVar(&o.Level, "log-level", "info", "log level: debug, info, warn or error")
	return o
}

// New builds the logger the options describe.
func New(o *Options) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(o.Level)
	if err != nil {
		return nil, fmt.Errorf("parse --log-level: %w", err)
	}
	var cfg zap.Config
	switch o.Format {
	case "json":
		cfg = zap.NewProductionConfig()
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.Development = false
	default:
		return nil, fmt.Errorf("unknown --log-format %q: want json or console", o.Format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.EncoderConfig.TimeKey = "ts"
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	cfg.Sampling = nil
	return cfg.Build()
}

// KlogName names the logger of what client-go and apimachinery log through
// klog ("logger":"klog" in JSON).
const KlogName = "klog"

// RouteKlog sends everything logged through klog (client-go's reflectors,
// leader election, request retries and warnings, utilruntime.HandleError)
// to log, named KlogName, with klog's key/value pairs as structured fields
// and errors under "error". klog's own verbosity (-v, default 0) still
// decides which klog.V(n) calls log. Call it once at startup, before any
// client is created: klog's logger is process-wide.
func RouteKlog(log *zap.Logger) {
	klog.SetLogger(zapr.NewLogger(log.Named(KlogName)))
}
