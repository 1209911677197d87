"""Real-component test rig: throwaway CA, Dovecot and slapd run as child processes."""
