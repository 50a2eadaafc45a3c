package api

import (
	"net/http"
	"slices"
	"strings"
)

// What a browser page at an allowed origin may send: every method the
// Clash API uses, and the two request headers a dashboard sets.
const (
	corsAllowMethods = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
	corsAllowHeaders = "Authorization, Content-Type"
)

// corsHandler lets pages at origins (api.cors: "scheme://host[:port]"
// entries, or "*" for any) call next from a browser. A request whose
// Origin is allowed gets Access-Control-Allow-Origin set to that origin,
// with the allowed methods and headers; its preflight (OPTIONS with
// Access-Control-Request-Method) is answered 204 here, so next, which
// checks the token, never sees it: a browser sends no Authorization
// header on a preflight. A preflight asking for Private Network Access
// (a public page calling the API on this host or LAN) gets it.
//
// A request from any other origin, or without one, goes to next with no
// CORS headers: the API answers as it would a non-browser client, and the
// browser withholds the answer from the page. With no origins configured
// next is returned as it is.
func corsHandler(origins []string, next http.Handler) http.Handler {
	if len(origins) == 0 {
		return next
	}
	anyOrigin := slices.Contains(origins, "*")
	allowed := func(origin string) bool {
		if anyOrigin {
			return true
		}
		// Scheme and host are case-insensitive; browsers send them in
		// lower case, users may not write them so.
		return slices.ContainsFunc(origins, func(o string) bool { return strings.EqualFold(o, origin) })
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The answer depends on Origin whether or not this one is
		// allowed: caches must not hand one origin's answer to another.
		w.Header().Add("Vary", "Origin")
		origin := r.Header.Get("Origin")
		if origin == "" || !allowed(origin) {
			next.ServeHTTP(w, r)
			return
		}
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Allow-Methods", corsAllowMethods)
		h.Set("Access-Control-Allow-Headers", corsAllowHeaders)
		if r.Method != http.MethodOptions || r.Header.Get("Access-Control-Request-Method") == "" {
			next.ServeHTTP(w, r)
			return
		}
		if strings.EqualFold(r.Header.Get("Access-Control-Request-Private-Network"), "true") {
			h.Set("Access-Control-Allow-Private-Network", "true")
		}
		h.Add("Vary", "Access-Control-Request-Private-Network")
		h.Set("Access-Control-Max-Age", "600")
		w.WriteHeader(http.StatusNoContent)
	})
}

// wsOriginPatterns turns origins (as corsHandler takes them) into
// github.com/coder/websocket's AcceptOptions.OriginPatterns, so a page
// that may call the REST API may also open its WebSocket streams
// (browsers apply no CORS to WebSockets; the server checks Origin
// itself). An origin becomes a "scheme://host[:port]" pattern with
// path.Match's special characters escaped (an IPv6 origin has brackets);
// "*" stays "*", which matches any origin.
func wsOriginPatterns(origins []string) []string {
	patterns := make([]string, 0, len(origins))
	for _, o := range origins {
		if o == "*" {
			patterns = append(patterns, o)
			continue
		}
		var b strings.Builder
		for _, c := range o {
			if strings.ContainsRune(`*?[]\`, c) {
				b.WriteByte('\\')
			}
			b.WriteRune(c)
		}
		patterns = append(patterns, b.String())
	}
	return patterns
}
