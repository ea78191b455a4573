"""scikit-learn estimators and kernels built on the infinite-width NTK / NNGP."""
