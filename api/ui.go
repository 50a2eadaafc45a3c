package api

import (
	"io/fs"
	"net/http"
	"strings"
)

// uiPrefix is where api.ui is served.
const uiPrefix = "/ui/"

// uiHandler serves the folder dir (api.ui, a dashboard's built files) at
// /ui/: /ui/ is dir/index.html, /ui/assets/app.js is dir/assets/app.js.
// It is meant to be mounted outside the token check: the files are
// static, and the API calls the dashboard makes carry the token. Files
// and folders whose name starts with a dot (.git, .env) are neither
// served nor listed. A folder without index.html is listed.
func uiHandler(dir string) http.Handler {
	h := http.StripPrefix(strings.TrimSuffix(uiPrefix, "/"), http.FileServer(noDotFiles{http.Dir(dir)}))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		h.ServeHTTP(w, r)
	})
}

// noDotFiles is an http.FileSystem that hides every path with a component
// starting with a dot.
type noDotFiles struct{ http.FileSystem }

// Open implements http.FileSystem.Open.
func (fsys noDotFiles) Open(name string) (http.File, error) {
	for part := range strings.SplitSeq(name, "/") {
		if strings.HasPrefix(part, ".") {
			return nil, fs.ErrNotExist
		}
	}
	f, err := fsys.FileSystem.Open(name)
	if err != nil {
		return nil, err
	}
	return noDotFile{f}, nil
}

// noDotFile is an http.File whose directory listings leave out dot files.
type noDotFile struct{ http.File }

// Readdir implements http.File.Readdir.
func (f noDotFile) Readdir(n int) ([]fs.FileInfo, error) {
	entries, err := f.File.Readdir(n)
	kept := entries[:0]
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			kept = append(kept, e)
		}
	}
	return kept, err
}

// ReadDir implements fs.ReadDirFile.ReadDir, which http.FileServer
// prefers to Readdir when a file has it.
func (f noDotFile) ReadDir(n int) ([]fs.DirEntry, error) {
	rd, ok := f.File.(fs.ReadDirFile)
	if !ok {
		infos, err := f.Readdir(n)
		entries := make([]fs.DirEntry, len(infos))
		for i, fi := range infos {
			entries[i] = fs.FileInfoToDirEntry(fi)
		}
		return entries, err
	}
	entries, err := rd.ReadDir(n)
	kept := entries[:0]
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			kept = append(kept, e)
		}
	}
	return kept, err
}
