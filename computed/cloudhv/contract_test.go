package cloudhv

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// The contract half of the test server: the OpenAPI document of Cloud Hypervisor's API, loaded with kin-openapi,
// checks every request the driver sends and every answer the fake VMM gives.

// specPath is the copy of the OpenAPI document the tests validate against.
func specPath() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "testdata", "cloud-hypervisor-openapi.yaml")
}

type contract struct {
	doc    *openapi3.T
	router routers.Router
}

func loadContract(path string) (*contract, error) {
	doc, err := openapi3.NewLoader().LoadFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", path, err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("%s is not a valid OpenAPI document: %w", path, err)
	}
	strictify(doc)
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		return nil, fmt.Errorf("routing %s: %w", path, err)
	}
	return &contract{doc: doc, router: router}, nil
}

// strictify makes every object schema that lists its properties reject others. The document leaves
// additionalProperties open, under which a misspelt field ("boot_vcpu") would validate and Cloud Hypervisor
// would ignore it or fail on it; the driver must only send fields the contract names.
func strictify(doc *openapi3.T) {
	seen := make(map[*openapi3.Schema]bool)
	var walk func(*openapi3.SchemaRef)
	walk = func(ref *openapi3.SchemaRef) {
		if ref == nil || ref.Value == nil || seen[ref.Value] {
			return
		}
		s := ref.Value
		seen[s] = true
		if s.Type.Is("object") && len(s.Properties) > 0 && s.AdditionalProperties.Has == nil && s.AdditionalProperties.Schema == nil {
			no := false
			s.AdditionalProperties.Has = &no
		}
		for _, p := range s.Properties {
			walk(p)
		}
		walk(s.Items)
		walk(s.AdditionalProperties.Schema)
		walk(s.Not)
		for _, refs := range []openapi3.SchemaRefs{s.AllOf, s.AnyOf, s.OneOf} {
			for _, r := range refs {
				walk(r)
			}
		}
	}
	for _, s := range doc.Components.Schemas {
		walk(s)
	}
}

func (c *contract) options() *openapi3filter.Options {
	return &openapi3filter.Options{
		MultiError: true,
		// A body sent to an endpoint that takes none is a driver bug too.
		RejectWhenRequestBodyNotSpecified: true,
		// Validation must not rewrite the request with the schema's defaults: the fake sees what was sent.
		SkipSettingDefaults: true,
	}
}

// validateRequest checks method, path and body of r (whose body has been read into body).
func (c *contract) validateRequest(r *http.Request, body []byte) (*openapi3filter.RequestValidationInput, error) {
	route, params, err := c.router.FindRoute(r)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", r.Method, r.URL.Path, err)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	in := &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route, Options: c.options()}
	if err := openapi3filter.ValidateRequest(r.Context(), in); err != nil {
		return nil, fmt.Errorf("%s %s body %s: %w", r.Method, r.URL.Path, truncate(body, 300), err)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	return in, nil
}

// validateResponse checks an answer against the operation's declared responses.
func (c *contract) validateResponse(in *openapi3filter.RequestValidationInput, status int, header http.Header, body []byte) error {
	out := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in,
		Status:                 status,
		Header:                 header,
		Options:                c.options(),
	}
	out.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(in.Request.Context(), out); err != nil {
		return fmt.Errorf("%s %s answered %d %s: %w", in.Request.Method, in.Request.URL.Path, status, truncate(body, 300), err)
	}
	return nil
}

// validating wraps a handler (the fake VMM) with the contract: a request that breaks it is answered 400 and
// reported; an answer that breaks it (a bug in the fake) is replaced by a 500 and reported.
type validating struct {
	contract *contract
	next     http.Handler
	report   func(violation string)
}

func (v *validating) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	in, err := v.contract.validateRequest(r, body)
	if err != nil {
		v.report("request: " + err.Error())
		http.Error(w, "contract violation: "+err.Error(), http.StatusBadRequest)
		return
	}
	rec := httptest.NewRecorder()
	v.next.ServeHTTP(rec, r)
	if err := v.contract.validateResponse(in, rec.Code, rec.Header(), rec.Body.Bytes()); err != nil {
		v.report("response: " + err.Error())
		http.Error(w, "fake VMM answered outside the contract: "+err.Error(), http.StatusInternalServerError)
		return
	}
	for k, vals := range rec.Header() {
		w.Header()[k] = vals
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

// isViolation reports whether err is the fake's answer to a request that broke the contract.
func isViolation(err error) bool {
	return IsStatus(err, http.StatusBadRequest) && strings.Contains(err.Error(), "contract violation")
}
