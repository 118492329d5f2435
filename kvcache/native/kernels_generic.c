/* The kernels at the compiler's baseline instruction set (SSE2 on x86-64). */
#define KERNEL(name) shoal_generic_##name
#include "kernels.h"
