package kube

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"github.com/egressnat/egressnat/leader/probe"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// ProbeKey reads the probe key (package probe) from the Secret
// namespace/name. With create, a missing Secret is created with a random
// 32-byte key (the operator does; the agents only read). created tells
// whether this call created it.
func ProbeKey(ctx context.Context, client kubernetes.Interface, namespace, name string, create bool) (key []byte, created bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	secrets := client.CoreV1().Secrets(namespace)
	s, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if create && apierrors.IsNotFound(err) {
		key := make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, false, fmt.Errorf("generate probe key: %w", err)
		}
		s, err = secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{LabelComponent: "operator"}},
			Data:       map[string][]byte{probe.SecretKey: key},
		}, metav1.CreateOptions{})
		created = err == nil
		if apierrors.IsAlreadyExists(err) {
			// Another replica created it first.
			s, err = secrets.Get(ctx, name, metav1.GetOptions{})
		}
	}
	if err != nil {
		return nil, false, fmt.Errorf("probe secret %s/%s: %w", namespace, name, err)
	}
	key = s.Data[probe.SecretKey]
	if len(key) < probe.MinKeyLen {
		return nil, false, fmt.Errorf("probe secret %s/%s: key %q holds %d bytes, want at least %d", namespace, name, probe.SecretKey, len(key), probe.MinKeyLen)
	}
	return key, created, nil
}

// ProbeKeyLoop keeps a probe key loaded (KeepProbeKey).
type ProbeKeyLoop struct {
	Client          kubernetes.Interface
	Namespace, Name string
	// Create: create the Secret with a random key when it is missing.
	Create bool
	// Retry: how soon a failed load is tried again; RetryWithKey: the
	// same once a key was loaded (the old key serves meanwhile).
	Retry, RetryWithKey time.Duration
	// Loaded receives each key loaded, with whether this load created it;
	// Failed each error.
	Loaded func(key []byte, created bool)
	Failed func(err error)
	Clock  clock.Clock
}

// probeKeyReload: how often a loaded key is read again (a rotated key
// takes effect without a restart).
const probeKeyReload = 30 * time.Second

// KeepProbeKey loads the probe key until ctx ends: again every 30 s once
// loaded, and after l.Retry (l.RetryWithKey once a key was loaded) when a
// load fails.
func KeepProbeKey(ctx context.Context, l ProbeKeyLoop) {
	loaded := false
	for {
		wait := probeKeyReload
		key, created, err := ProbeKey(ctx, l.Client, l.Namespace, l.Name, l.Create)
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			wait = l.Retry
			if loaded {
				wait = l.RetryWithKey
			}
			l.Failed(err)
		default:
			loaded = true
			l.Loaded(key, created)
		}
		select {
		case <-ctx.Done():
			return
		case <-l.Clock.After(wait):
		}
	}
}
