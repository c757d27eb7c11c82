"""x86-64: CPUID, MSRs, registers, tables and the guest-physical layout."""
