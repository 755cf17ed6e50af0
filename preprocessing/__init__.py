"""Raw DICOM / NIfTI brain MRI exams to co-registered, skull-stripped, standardized volumes."""
