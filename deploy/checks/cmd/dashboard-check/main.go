// dashboard-check strictly decodes Grafana dashboard JSON files into the
// grafana-foundation-sdk model (unknown fields, wrong types and missing
// required fields are errors), runs the SDK's Validate(), and exits 1 on any
// problem. gaps.go covers what the SDK's strict decoder misses; clickhouse.go
// adds a model for ClickHouse targets, which the SDK lacks.
//
// Usage: dashboard-check FILE.json...
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// sdkErr works around the SDK's generated UnmarshalJSONStrict (and the variant
// unmarshalers built on it) returning a non-nil error that holds an empty
// cog.BuildErrors on success.
func sdkErr(err error) error {
	var be cog.BuildErrors
	if errors.As(err, &be) && len(be) == 0 {
		return nil
	}
	return err
}

func check(path string) (notes []string, err error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	// 1. The SDK's strict decode: unknown fields, wrong types, missing required fields.
	var strict dashboard.Dashboard
	if err := sdkErr(strict.UnmarshalJSONStrict(raw)); err != nil {
		return nil, fmt.Errorf("strict decode:\n%w", err)
	}
	// 2. Strictly decode what step 1 lets through (see gaps.go).
	if err := strictGaps(raw); err != nil {
		return nil, fmt.Errorf("strict decode:\n%w", err)
	}
	// 3. Step 1 drops the panels it decoded without error (same empty-error
	// quirk), so validate a leniently decoded copy, which keeps typed panels,
	// options and targets.
	var d dashboard.Dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	var errs cog.BuildErrors
	if err := sdkErr(d.Validate()); err != nil {
		errs = cog.MakeBuildErrors("Dashboard", err)
	}
	notes, perPanel := validatePanels(d)
	if errs = append(errs, perPanel...); len(errs) > 0 {
		return notes, fmt.Errorf("validate:\n%w", errs)
	}
	return notes, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dashboard-check FILE.json...")
		os.Exit(2)
	}
	// Register the SDK's panel variants (typed options / fieldConfig.defaults.custom
	// per panel type) and data query variants (typed targets per datasource type);
	// without this, those decode as untyped maps and are not checked at all.
	plugins.RegisterDefaultPlugins()
	cog.NewRuntime().RegisterDataqueryVariant(clickhouseVariant()) // ours, see clickhouse.go

	failed := 0
	for _, path := range os.Args[1:] {
		notes, err := check(path)
		for _, n := range notes {
			fmt.Fprintf(os.Stderr, "note %s: %s\n", path, n)
		}
		if err != nil {
			failed++
			fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", path, err)
			continue
		}
		fmt.Printf("ok   %s\n", path)
	}
	if failed > 0 {
		os.Exit(1)
	}
}
