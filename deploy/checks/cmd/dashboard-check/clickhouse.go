package main

// A strict model for targets of the official ClickHouse datasource
// (grafana-clickhouse-datasource), which grafana-foundation-sdk v0.0.22 lacks:
// Grafana's DataQuery base fields + the plugin's CHQuery fields (src/types in
// grafana/clickhouse-datasource); builderOptions and meta are kept as raw JSON.

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/variants"
	"github.com/grafana/grafana-foundation-sdk/go/common"
)

type clickhouseQuery struct {
	RefId             string                `json:"refId"`
	Hide              *bool                 `json:"hide,omitempty"`
	Key               string                `json:"key,omitempty"`
	QueryType         string                `json:"queryType,omitempty"`
	Datasource        *common.DataSourceRef `json:"datasource,omitempty"`
	PluginVersion     string                `json:"pluginVersion,omitempty"`
	EditorType        string                `json:"editorType,omitempty"`
	RawSql            string                `json:"rawSql,omitempty"`
	Format            *int                  `json:"format,omitempty"`
	SelectedFormat    *int                  `json:"selectedFormat,omitempty"`
	Database          string                `json:"database,omitempty"`
	Table             string                `json:"table,omitempty"`
	SelectedQueryType string                `json:"selectedQueryType,omitempty"`
	Expand            *bool                 `json:"expand,omitempty"`
	Meta              json.RawMessage       `json:"meta,omitempty"`
	BuilderOptions    json.RawMessage       `json:"builderOptions,omitempty"`
}

func (q *clickhouseQuery) ImplementsDataqueryVariant()          {}
func (q *clickhouseQuery) DataqueryType() string                { return "grafana-clickhouse-datasource" }
func (q *clickhouseQuery) Equals(other variants.Dataquery) bool { return reflect.DeepEqual(q, other) }
func (q *clickhouseQuery) Validate() error {
	switch {
	case q.RefId == "":
		return errors.New("refId: required")
	case q.EditorType != "" && q.EditorType != "sql" && q.EditorType != "builder":
		return fmt.Errorf("editorType: %q is not sql or builder", q.EditorType)
	case q.EditorType != "builder" && strings.TrimSpace(q.RawSql) == "":
		return errors.New("rawSql: required with the SQL editor")
	}
	return nil
}

func decodeClickhouse(raw []byte, strict bool) (variants.Dataquery, error) {
	q := &clickhouseQuery{}
	if err := json.Unmarshal(raw, q); err != nil {
		return nil, err
	}
	if !strict {
		return q, nil
	}
	// encoding/json matches keys case-insensitively ("rawSQL" fills RawSql) even
	// with DisallowUnknownFields, so compare the exact keys with the json tags.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, err
	}
	known := map[string]bool{}
	for f := range reflect.TypeFor[clickhouseQuery]().Fields() {
		known[strings.Split(f.Tag.Get("json"), ",")[0]] = true
	}
	var errs cog.BuildErrors
	for _, k := range slices.Sorted(maps.Keys(fields)) {
		if !known[k] {
			errs = append(errs, &cog.BuildError{Path: "ClickhouseQuery", Message: fmt.Sprintf("unexpected field '%s'", k)})
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return q, nil
}

func clickhouseVariant() variants.DataqueryConfig {
	return variants.DataqueryConfig{
		Identifier:                 "grafana-clickhouse-datasource",
		DataqueryUnmarshaler:       func(raw []byte) (variants.Dataquery, error) { return decodeClickhouse(raw, false) },
		StrictDataqueryUnmarshaler: func(raw []byte) (variants.Dataquery, error) { return decodeClickhouse(raw, true) },
	}
}
