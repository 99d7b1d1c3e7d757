# SPDX-License-Identifier: Apache-2.0
"""Classes living outside kv_offload, loaded by module path in the registry tests."""
