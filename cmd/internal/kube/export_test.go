package kube

// SetListPageSize sets the page size of SlimPodInformer's lists until the
// returned function restores it.
func SetListPageSize(n int64) (restore func()) {
	old := listPageSize
	listPageSize = n
	return func() { listPageSize = old }
}
